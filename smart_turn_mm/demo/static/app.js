// Smart Turn Multimodal live demo: microphone (16 kHz PCM from an AudioWorklet) and camera
// (JPEG frames) to the server over a WebSocket; events back. Protocol: see server.py.
// URL options: ?autostart=1&redemption=fast&sensitivity=aggressive&fps=30

const KIND_AUDIO = 1, KIND_JPEG = 2, KIND_FACE = 16;
const SAMPLE_RATE = 16000;
const CHUNK_SAMPLES = 320; // 20 ms
const HEADER_BYTES = 16;
const MAX_BUFFERED = 1 << 20; // skip camera frames while more than this waits to be sent
const WAVE_SECONDS = 6;

const $ = (id) => document.getElementById(id);
const query = new URLSearchParams(location.search);
const fps = Math.min(30, Math.max(1, Number(query.get("fps")) || 30));

let ws = null;
let samplesSent = 0;
let threshold = 0.5;
const counts = { speech: 0, commit: 0, decision: 0 };

function header(kind, timestamp, width = 0, height = 0) {
  const buf = new ArrayBuffer(HEADER_BYTES);
  const v = new DataView(buf);
  v.setUint8(0, kind);
  v.setUint8(1, 1);
  v.setUint16(2, width, true);
  v.setUint16(4, height, true);
  v.setUint16(6, 0, true);
  v.setFloat64(8, timestamp, true);
  return new Uint8Array(buf);
}

function send(kind, timestamp, payload, width = 0, height = 0) {
  if (!ws || ws.readyState !== WebSocket.OPEN) return;
  const body = new Uint8Array(payload);
  const msg = new Uint8Array(HEADER_BYTES + body.length);
  msg.set(header(kind, timestamp, width, height), 0);
  msg.set(body, HEADER_BYTES);
  ws.send(msg.buffer);
}

function setStatus(text, state) {
  $("status").textContent = text;
  $("status-dot").className = "dot " + (state || "");
  document.body.dataset.connected = String(state === "on");
}

function logLine(text) {
  $("log").textContent = text;
}

// ---------------------------------------------------------------- waveform

const wave = new Float32Array(WAVE_SECONDS * SAMPLE_RATE / 160); // peak per 10 ms
let waveWrite = 0;

function pushWave(int16) {
  for (let i = 0; i < int16.length; i += 160) {
    let peak = 0;
    for (let j = i; j < Math.min(i + 160, int16.length); j++) peak = Math.max(peak, Math.abs(int16[j]) / 32768);
    wave[waveWrite % wave.length] = peak;
    waveWrite++;
  }
}

function drawWave() {
  const c = $("waveform");
  const g = c.getContext("2d");
  g.clearRect(0, 0, c.width, c.height);
  g.fillStyle = "#4fb3ff";
  const n = wave.length;
  const mid = c.height / 2;
  for (let x = 0; x < c.width; x++) {
    const k = waveWrite - n + Math.floor((x / c.width) * n);
    const v = k >= 0 ? wave[k % n] : 0;
    const h = Math.max(1, Math.min(1, v * 3) * mid);
    g.fillRect(x, mid - h, 1, 2 * h);
  }
  requestAnimationFrame(drawWave);
}

// ---------------------------------------------------------------- server messages

function fmt(v, digits = 3) {
  return v === null || v === undefined ? "-" : Number(v).toFixed(digits);
}

function ms(v) {
  return v === null || v === undefined ? "-" : `${Number(v).toFixed(1)} ms`;
}

function setProb(id, p) {
  $(id).textContent = fmt(p);
  $(id + "-bar").style.height = p === null || p === undefined ? "0" : `${(100 * p).toFixed(1)}%`;
}

function applyParams(params) {
  threshold = params.threshold;
  for (const el of document.querySelectorAll(".column .threshold")) el.style.bottom = `${100 * threshold}%`;
  const red = { 200: "fast", 300: "balanced", 500: "relaxed" }[Math.round(params.redemption_ms)];
  const sens = { 0.3: "aggressive", 0.5: "normal", 0.7: "conservative" }[params.threshold];
  if (red) $("redemption").value = red;
  if (sens) $("sensitivity").value = sens;
}

function addHistory(e) {
  const row = document.createElement("tr");
  row.className = e.kind;
  const label = e.kind === "turn_complete" ? `turn complete (${e.reason})` : e.kind.replace("_", " ") + (e.resumed ? " (resumed)" : "");
  const cells = [
    `${e.time_s.toFixed(2)} s`, e.turn_id, label, fmt(e.audio_probability), fmt(e.av_probability),
    e.silence_ms === null ? "-" : `${Math.round(e.silence_ms)} ms`, ms(e.model_ms), ms(e.delay_after_redemption_ms),
  ];
  for (const text of cells) {
    const td = document.createElement("td");
    td.textContent = text;
    row.appendChild(td);
  }
  const body = $("history");
  body.insertBefore(row, body.firstChild);
  while (body.children.length > 200) body.removeChild(body.lastChild);
}

function onEvent(e) {
  if (e.kind === "speech_start") {
    counts.speech++;
    $("verdict").textContent = e.resumed ? "speech resumed" : "listening";
    $("verdict").className = "verdict";
  } else if (e.kind === "speech_end") {
    $("verdict").textContent = "pause: deciding...";
    $("verdict").className = "verdict";
  } else if (e.kind === "decision" || e.kind === "turn_complete") {
    if (e.model_ms !== null) counts.decision++;
    if (e.kind === "turn_complete") counts.commit++;
    if (e.audio_probability !== null) setProb("p-audio", e.audio_probability);
    setProb("p-av", e.av_probability);
    const complete = e.kind === "turn_complete";
    $("verdict").textContent = complete
      ? `TURN COMPLETE${e.reason === "max_silence" ? " (max silence)" : ""}`
      : "incomplete: keep listening";
    $("verdict").className = "verdict " + (complete ? "complete" : "incomplete");
    $("d-silence").textContent = e.silence_ms === null ? "-" : `${Math.round(e.silence_ms)} ms`;
    $("d-model").textContent = ms(e.model_ms);
    $("d-delay").textContent = ms(e.delay_after_redemption_ms);
  } else if (e.kind === "cancelled") {
    $("verdict").textContent = "speech resumed: decision cancelled";
    $("verdict").className = "verdict";
  }
  if (e.kind !== "speech_end") addHistory(e);
  document.body.dataset.speechCount = counts.speech;
  document.body.dataset.commitCount = counts.commit;
  document.body.dataset.decisionCount = counts.decision;
}

function onVad(m) {
  const state = m.state === "speech" ? "speech" : m.state === "pause" ? "pause" : "idle";
  const badge = $("vad-state");
  badge.textContent = { speech: "SPEAKING", pause: "PAUSE", idle: "IDLE" }[state];
  badge.className = "badge " + state;
  $("vad-bar").style.width = `${(100 * m.probability).toFixed(0)}%`;
  $("vad-value").textContent = m.probability.toFixed(2);
  $("turn-id").textContent = m.turn_id;
  $("stream-time").textContent = m.time_s.toFixed(1);
}

function onFace(buf) {
  const v = new DataView(buf);
  const width = v.getUint16(2, true), height = v.getUint16(4, true), found = v.getUint16(6, true);
  const rgb = new Uint8Array(buf, HEADER_BYTES);
  const c = $("face");
  c.width = width;
  c.height = height;
  const img = new ImageData(width, height);
  for (let i = 0, j = 0; i < rgb.length; i += 3, j += 4) {
    img.data[j] = rgb[i];
    img.data[j + 1] = rgb[i + 1];
    img.data[j + 2] = rgb[i + 2];
    img.data[j + 3] = 255;
  }
  c.getContext("2d").putImageData(img, 0, 0);
  $("face-label").textContent = found ? "face found" : "no face: centre crop";
}

function onMessage(ev) {
  if (typeof ev.data !== "string") {
    if (new DataView(ev.data).getUint8(0) === KIND_FACE) onFace(ev.data);
    return;
  }
  const m = JSON.parse(ev.data);
  if (m.type === "ready") {
    $("model").textContent = m.model;
    $("model-kind").textContent = m.has_video ? "(audio + video)" : "(audio only)";
    applyParams(m.params);
    const wanted = {};
    for (const key of ["redemption", "sensitivity"]) if (query.get(key)) wanted[key] = query.get(key);
    if (Object.keys(wanted).length) ws.send(JSON.stringify({ type: "params", ...wanted }));
  } else if (m.type === "params") applyParams(m.params);
  else if (m.type === "vad") onVad(m);
  else if (m.type === "event") onEvent(m);
  else if (m.type === "error") logLine(`server refused a message: ${m.reason}`);
}

// ---------------------------------------------------------------- capture

function connect() {
  return new Promise((resolve, reject) => {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    ws = new WebSocket(`${scheme}://${location.host}/ws`);
    ws.binaryType = "arraybuffer";
    ws.onopen = () => { setStatus("connected", "on"); resolve(); };
    ws.onerror = () => reject(new Error("WebSocket error"));
    ws.onclose = (e) => setStatus(`disconnected (${e.code}${e.reason ? ": " + e.reason : ""})`, "off");
    ws.onmessage = onMessage;
  });
}

async function startAudio(stream) {
  const ctx = new AudioContext({ sampleRate: SAMPLE_RATE });
  await ctx.audioWorklet.addModule("/static/pcm-worklet.js");
  const source = ctx.createMediaStreamSource(stream);
  const node = new AudioWorkletNode(ctx, "pcm-sender", {
    processorOptions: { targetRate: SAMPLE_RATE, chunkSamples: CHUNK_SAMPLES },
  });
  const mute = ctx.createGain();
  mute.gain.value = 0;
  source.connect(node).connect(mute).connect(ctx.destination); // keeps the graph running
  node.port.onmessage = (e) => {
    const pcm = new Int16Array(e.data);
    send(KIND_AUDIO, samplesSent / SAMPLE_RATE, pcm.buffer);
    samplesSent += pcm.length;
    pushWave(pcm);
  };
  if (ctx.state !== "running") await ctx.resume();
}

function startCamera(stream) {
  const video = $("camera");
  video.srcObject = stream;
  video.play().catch(() => {});
  const canvas = document.createElement("canvas");
  const g = canvas.getContext("2d");
  let busy = false;
  setInterval(() => {
    if (busy || video.readyState < 2 || !ws || ws.readyState !== WebSocket.OPEN) return;
    if (ws.bufferedAmount > MAX_BUFFERED) return;
    canvas.width = video.videoWidth;
    canvas.height = video.videoHeight;
    g.drawImage(video, 0, 0);
    const t = samplesSent / SAMPLE_RATE;
    busy = true;
    canvas.toBlob(async (blob) => {
      busy = false;
      if (blob) send(KIND_JPEG, t, await blob.arrayBuffer(), canvas.width, canvas.height);
    }, "image/jpeg", 0.85);
  }, 1000 / fps);
}

async function start() {
  $("start").disabled = true;
  try {
    setStatus("connecting...");
    await connect();
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({
        audio: { channelCount: 1, echoCancellation: true, noiseSuppression: false, autoGainControl: false },
        video: { width: 320, height: 240, frameRate: fps },
      });
    } catch (err) {
      logLine(`no camera (${err.name}): audio only`);
      stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    }
    await startAudio(stream);
    if (stream.getVideoTracks().length) startCamera(stream);
  } catch (err) {
    setStatus(`error: ${err.message}`, "off");
    $("start").disabled = false;
  }
}

$("start").addEventListener("click", start);
for (const id of ["redemption", "sensitivity"]) {
  $(id).addEventListener("change", () => {
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "params", [id]: $(id).value }));
  });
}
requestAnimationFrame(drawWave);
if (query.get("autostart") === "1") start();
