// AudioWorklet: microphone -> 16 kHz mono int16 chunks posted to the page (20 ms each).
// The page asks for a 16 kHz AudioContext, so normally no resampling happens here; if the
// browser runs another rate, samples are resampled by linear interpolation.
class PcmSender extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const o = (options && options.processorOptions) || {};
    this.target = o.targetRate || 16000;
    this.chunk = o.chunkSamples || 320;
    this.step = sampleRate / this.target; // input samples per output sample
    this.buf = new Int16Array(this.chunk);
    this.n = 0;
    this.t = 0; // position of the next output sample, in input samples since `prev`
    this.prev = 0; // the last input sample of the previous block
  }

  emit(x) {
    const v = Math.max(-1, Math.min(1, x));
    this.buf[this.n++] = v < 0 ? v * 32768 : v * 32767;
    if (this.n === this.chunk) {
      this.port.postMessage(this.buf.buffer, [this.buf.buffer]);
      this.buf = new Int16Array(this.chunk);
      this.n = 0;
    }
  }

  process(inputs) {
    const input = inputs[0];
    if (!input || input.length === 0) return true;
    let mono = input[0];
    if (input.length > 1) {
      mono = new Float32Array(input[0].length);
      for (const channel of input) for (let i = 0; i < mono.length; i++) mono[i] += channel[i] / input.length;
    }
    if (this.step === 1) {
      for (let i = 0; i < mono.length; i++) this.emit(mono[i]);
      return true;
    }
    // Linear interpolation between prev (index -1) and mono[0..n-1].
    while (this.t < mono.length) {
      const i = Math.floor(this.t);
      const frac = this.t - i;
      const a = i === 0 ? this.prev : mono[i - 1];
      const b = mono[i];
      this.emit(a + (b - a) * frac);
      this.t += this.step;
    }
    this.t -= mono.length;
    this.prev = mono[mono.length - 1];
    return true;
  }
}

registerProcessor("pcm-sender", PcmSender);
