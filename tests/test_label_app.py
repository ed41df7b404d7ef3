"""The labelling page: atomic, revision-checked saves; the page itself in headless Chromium."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import shutil
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from talking_heads import have_espeak, prepared_dataset

from smart_turn_mm import metafile
from smart_turn_mm.autolabel import autolabel
from smart_turn_mm.label_app import LOG_NAME, StaleRowError, make_app, save_label

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--autoplay-policy=no-user-gesture-required",
]
needs_browser = pytest.mark.skipif(
    not CHROMIUM.is_file() or importlib.util.find_spec("playwright") is None,
    reason="needs Debian's chromium (/usr/bin/chromium) and the playwright Python package",
)
needs_espeak = pytest.mark.skipif(not have_espeak(), reason="espeak-ng is not installed")


def _rows(folder: Path) -> list[dict]:
    return metafile.read_jsonl(folder / "metadata.jsonl")


def _synthetic(folder: Path, n: int = 6) -> Path:
    rows = [
        {"file_name": f"audio/s_{i}.wav", "id": f"s_{i}", "endpoint_bool": None, "source": "s"}
        for i in range(n)
    ]
    metafile.rewrite_jsonl(folder / "metadata.jsonl", rows)
    return folder


@pytest.fixture()
def dataset(tmp_path_factory, tmp_path) -> Path:
    """A prepared, autolabelled copy of the generated talking heads."""
    _, prepared = prepared_dataset(tmp_path_factory.getbasetemp())
    folder = tmp_path / "dataset"
    shutil.copytree(prepared, folder)
    autolabel(folder)
    return folder


@contextlib.contextmanager
def serve(folder: Path) -> Iterator[str]:
    """Run the labelling server on a free port in a background thread; yields its URL."""
    from aiohttp import web

    loop = asyncio.new_event_loop()
    runner = web.AppRunner(make_app(folder))
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def _request(url: str, body: dict | None = None) -> tuple[int, dict | bytes]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, payload = response.status, response.read()
    except urllib.error.HTTPError as e:
        status, payload = e.code, e.read()
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, payload


# --------------------------------------------------------------------------- saving


def test_save_checks_the_row_revision(tmp_path):
    folder = _synthetic(tmp_path)
    row = _rows(folder)[1]
    rev = metafile.row_rev(row)
    saved = save_label(folder, "s_1", rev, {"endpoint_bool": True, "visual_tags": ["b", "a"]})
    assert saved["endpoint_bool"] is True and saved["visual_tags"] == ["a", "b"]
    stored = _rows(folder)[1]
    assert stored["label_source"] == "manual" and saved["rev"] == metafile.row_rev(stored)
    with pytest.raises(StaleRowError) as error:  # a second tab still holds the old revision
        save_label(folder, "s_1", rev, {"endpoint_bool": False})
    assert error.value.row["endpoint_bool"] is True
    assert _rows(folder)[1]["endpoint_bool"] is True
    with pytest.raises(KeyError):
        save_label(folder, "nope", rev, {"endpoint_bool": False})
    with pytest.raises(ValueError, match="true, false or null"):
        save_label(folder, "s_1", saved["rev"], {"endpoint_bool": "yes"})
    with pytest.raises(ValueError, match="nothing to save"):
        save_label(folder, "s_1", saved["rev"], {})
    log = metafile.read_jsonl(folder / LOG_NAME)
    assert len(log) == 1 and log[0]["new"]["endpoint_bool"] is True


def test_concurrent_saves_never_corrupt_or_lose_a_label(tmp_path):
    folder = _synthetic(tmp_path, n=8)

    def label_many(i: int) -> int:
        rejected = 0
        for k in range(6):
            row = next(r for r in _rows(folder) if r["id"] == f"s_{i}")
            rev = metafile.row_rev(row)
            save_label(folder, row["id"], rev, {"endpoint_bool": k % 2 == 0})
            try:  # the same revision again: stale, must be rejected
                save_label(folder, row["id"], rev, {"endpoint_bool": None})
            except StaleRowError:
                rejected += 1
        return rejected

    with ThreadPoolExecutor(8) as pool:
        rejected = list(pool.map(label_many, range(8)))
    assert rejected == [6] * 8
    rows = _rows(folder)  # valid JSONL, every row present, the last label of each kept
    assert [r["id"] for r in rows] == [f"s_{i}" for i in range(8)]
    assert all(r["endpoint_bool"] is False for r in rows)
    assert len(metafile.read_jsonl(folder / LOG_NAME)) == 8 * 6


def test_http_api(tmp_path):
    folder = _synthetic(tmp_path)
    (folder / "audio").mkdir()
    (folder / "audio" / "s_0.wav").write_bytes(b"RIFF....")
    with serve(folder) as url:
        status, data = _request(url + "/api/segments")
        assert status == 200 and len(data["rows"]) == 6 and data["tags"]
        row = data["rows"][0]
        status, data = _request(
            f"{url}/api/segments/s_0", {"rev": row["rev"], "endpoint_bool": False}
        )
        assert status == 200 and data["row"]["endpoint_bool"] is False
        status, data = _request(
            f"{url}/api/segments/s_0", {"rev": row["rev"], "endpoint_bool": True}
        )
        assert status == 409 and data["row"]["endpoint_bool"] is False
        assert _request(f"{url}/api/segments/zz", {"rev": "x", "endpoint_bool": True})[0] == 404
        assert _request(f"{url}/api/segments/s_0", {"endpoint_bool": True})[0] == 400
        assert _request(url + "/media/audio/s_0.wav") == (200, b"RIFF....")
        for path in ("metadata.jsonl", "audio/%2e%2e/metadata.jsonl", "audio/nope.wav"):
            assert _request(f"{url}/media/{path}")[0] == 404
    assert _rows(folder)[0]["endpoint_bool"] is False
    with pytest.raises(FileNotFoundError, match="prepare"):
        make_app(tmp_path / "missing")


# --------------------------------------------------------------------------- the page


@contextlib.contextmanager
def browser() -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def _open(context, url: str):
    page = context.new_page()
    page.goto(url)
    page.wait_for_selector("#list li")
    page.wait_for_function("video.readyState >= 2 || video.hidden")
    return page


def _settle(page) -> None:
    page.evaluate("state.queue")  # every queued save has been answered


@needs_browser
@needs_espeak
def test_page_plays_segments_and_labels_with_the_keyboard(dataset, tmp_path):
    rows = _rows(dataset)
    with serve(dataset) as url, browser() as chromium:
        page = _open(chromium.new_context(viewport={"width": 1200, "height": 640}), url)
        ids = page.evaluate("state.rows.map(r => r.id)")
        assert ids == [r["id"] for r in rows]
        first = rows[0]
        # the face clip and its sound are loaded and play together
        assert page.evaluate("video.videoWidth") == 224
        page.wait_for_function("audio.readyState >= 2")
        assert page.evaluate("audio.duration") == pytest.approx(first["duration_s"], abs=0.05)
        page.keyboard.press("r")
        page.wait_for_function("video.currentTime > 0.2 && audio.currentTime > 0.2")
        page.keyboard.press("t")  # complete, then on to the next segment
        _settle(page)
        assert page.evaluate("state.index") == 1
        page.keyboard.press("2")  # tag the second segment
        page.keyboard.press("f")
        _settle(page)
        page.keyboard.press("k")
        page.wait_for_function("document.querySelector('#label').dataset.value === 'false'")
        page.wait_for_function("video.readyState >= 2 && !video.seeking")
        assert "manual" in page.inner_text("#info")  # confirmed by hand
        page.screenshot(path=str(tmp_path / "label_page.png"))
        text = page.inner_text("#main")
        assert rows[1]["id"] in text and "incomplete" in text and "face_occluded" in text
    after = _rows(dataset)
    assert (after[0]["endpoint_bool"], after[0]["label_source"]) == (True, "manual")
    assert after[1]["endpoint_bool"] is False and after[1]["visual_tags"] == ["face_occluded"]
    assert after[1]["label_source"] == "manual"
    assert after[2:] == rows[2:]
    assert (tmp_path / "label_page.png").stat().st_size > 10_000


@needs_browser
@needs_espeak
def test_two_tabs_merge_different_rows_and_reject_a_stale_one(dataset):
    with serve(dataset) as url, browser() as chromium:
        context = chromium.new_context()
        a, b = _open(context, url), _open(context, url)
        ids = a.evaluate("state.rows.map(r => r.id)")
        # different rows at the same time: both saved
        b.keyboard.press("j")
        b.keyboard.press("j")
        a.keyboard.press("t")
        b.keyboard.press("f")
        _settle(a)
        _settle(b)
        labels = {r["id"]: r["endpoint_bool"] for r in _rows(dataset)}
        assert labels[ids[0]] is True and labels[ids[2]] is False
        # the same row: tab B still holds row 0's old revision: rejected, B reloads
        b.evaluate("select(0, false)")
        b.keyboard.press("u")
        _settle(b)
        assert "changed elsewhere" in b.inner_text("#status")
        assert {r["id"]: r["endpoint_bool"] for r in _rows(dataset)}[ids[0]] is True
        assert b.evaluate("state.rows[0].endpoint_bool") is True  # B now shows A's label
        b.evaluate("select(0, false)")
        b.keyboard.press("u")  # with the fresh revision the change goes through
        _settle(b)
    rows = _rows(dataset)  # one valid JSON object per line, nothing lost
    assert [r["id"] for r in rows] == ids
    assert {r["id"]: r["endpoint_bool"] for r in rows}[ids[0]] is None
    assert {r["id"]: r["endpoint_bool"] for r in rows}[ids[2]] is False
