"""``smart-turn-mm label DATASET_DIR``: a local web page to check and set segment labels.

The page plays each segment's face clip with its sound, shows its label, and sets
``endpoint_bool`` (true / false / unlabelled) and visual tags from the keyboard. The server
(:func:`make_app`, aiohttp) keeps ``metadata.jsonl`` safe:

* every save is an atomic rewrite under the folder lock (:mod:`smart_turn_mm.metafile`), so
  ``prepare``, ``autolabel`` and other tabs never see or leave a half-written file;
* every save names the row revision the page last saw (:func:`~smart_turn_mm.metafile.row_rev`);
  when the row changed since (another tab, ``autolabel``), the save is rejected with HTTP 409
  and the current row, and the page reloads: two tabs labelling DIFFERENT rows both save;
  two tabs labelling the SAME row never overwrite each other silently;
* each change is appended to ``label.log.jsonl``; a label set here gets
  ``label_source: "manual"``, which ``autolabel`` does not overwrite.

Only files under the dataset's ``audio/`` and ``video/`` folders are served; the server
listens on 127.0.0.1 unless told otherwise. Needs ``aiohttp`` (the ``label`` extra).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import metafile

__all__ = ["DEFAULT_TAGS", "LOG_NAME", "add_arguments", "make_app", "run", "save_label"]

METADATA_NAME = "metadata.jsonl"
LOG_NAME = "label.log.jsonl"
# Visual tags toggled with the keys 1-9 (``--tags`` replaces them).
DEFAULT_TAGS = (
    "looking_away",
    "face_occluded",
    "speaker_off_screen",
    "several_people",
    "bad_crop",
    "av_out_of_sync",
)
_STATIC = Path(__file__).resolve().parent / "static"
_MEDIA_FOLDERS = ("audio", "video")
# Fields of a row sent to the page.
_PAGE_FIELDS = (
    "id",
    "file_name",
    "clip_path",
    "video_path",
    "endpoint_bool",
    "visual_tags",
    "label_source",
    "source",
    "source_path",
    "segment_index",
    "num_segments",
    "is_last",
    "duration_s",
    "face_found",
    "transcript",
)
_MAX_TAG_LENGTH = 64


class StaleRowError(Exception):
    """The row changed since the page read it."""

    def __init__(self, row: dict[str, Any]) -> None:
        super().__init__(f"row {row.get('id')!r} changed since it was read")
        self.row = row


def _page_row(row: dict[str, Any]) -> dict[str, Any]:
    out = {name: row.get(name) for name in _PAGE_FIELDS}
    out["visual_tags"] = list(row.get("visual_tags") or [])
    out["rev"] = metafile.row_rev(row)
    return out


def _check_change(change: dict[str, Any]) -> dict[str, Any]:
    """Validate a save request's fields; returns the fields to set."""
    update: dict[str, Any] = {}
    if "endpoint_bool" in change:
        value = change["endpoint_bool"]
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"endpoint_bool must be true, false or null, got {value!r}")
        update["endpoint_bool"] = value
    if "visual_tags" in change:
        tags = change["visual_tags"]
        if not isinstance(tags, list) or not all(
            isinstance(t, str) and 0 < len(t) <= _MAX_TAG_LENGTH for t in tags
        ):
            raise ValueError(f"visual_tags must be a list of short strings, got {tags!r}")
        update["visual_tags"] = sorted(set(tags))
    if not update:
        raise ValueError("nothing to save: give endpoint_bool and/or visual_tags")
    return update


def save_label(root: Path, row_id: str, rev: str, change: dict[str, Any]) -> dict[str, Any]:
    """Apply ``change`` to row ``row_id`` if its revision is still ``rev``; returns the new
    page row. Blocking (file lock and fsync): run it in a thread from async code.

    Raises:
        KeyError: no such row.
        StaleRowError: the row's revision is no longer ``rev``.
        ValueError: invalid change.
    """
    update = _check_change(change)
    meta = root / METADATA_NAME
    with metafile.locked(root):
        rows = metafile.read_jsonl(meta)
        row = next((r for r in rows if r.get("id") == row_id), None)
        if row is None:
            raise KeyError(row_id)
        if metafile.row_rev(row) != rev:
            raise StaleRowError(_page_row(row))
        old = {name: row.get(name) for name in update}
        if "endpoint_bool" in update:  # a label confirmed by hand becomes a manual one
            update["label_source"] = "manual"
            old["label_source"] = row.get("label_source")
        if all(old[name] == value for name, value in update.items()):
            return _page_row(row)
        row.update(update)
        metafile.rewrite_jsonl(meta, rows)
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "id": row_id,
            "old": old,
            "new": update,
        }
        metafile.repair_tail(root / LOG_NAME)
        metafile.append_jsonl(root / LOG_NAME, [entry])
        return _page_row(row)


def _read_rows(root: Path) -> list[dict[str, Any]]:
    with metafile.locked(root):
        return [_page_row(r) for r in metafile.read_jsonl(root / METADATA_NAME)]


def make_app(root: str | Path, tags: Sequence[str] = DEFAULT_TAGS) -> Any:
    """The aiohttp application serving the labelling page for dataset folder ``root``."""
    from aiohttp import web

    root = Path(root).resolve()
    if not (root / METADATA_NAME).is_file():
        raise FileNotFoundError(
            f"{root / METADATA_NAME} not found: run `smart-turn-mm prepare` first"
        )
    tags = list(tags)

    async def blocking(func, *args):
        return await asyncio.get_running_loop().run_in_executor(
            None, functools.partial(func, *args)
        )

    async def index(_request: web.Request) -> web.StreamResponse:
        return web.FileResponse(_STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def segments(_request: web.Request) -> web.StreamResponse:
        try:
            rows = await blocking(_read_rows, root)
        except ValueError as e:
            return web.json_response({"error": str(e)}, status=500)
        return web.json_response(
            {"dataset": root.name, "tags": tags, "rows": rows},
            headers={"Cache-Control": "no-store"},
        )

    async def save(request: web.Request) -> web.StreamResponse:
        row_id = request.match_info["id"]
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": "the body must be JSON"}, status=400)
        if not isinstance(body, dict) or not isinstance(body.get("rev"), str):
            return web.json_response({"error": "expected {rev, endpoint_bool?, ...}"}, status=400)
        try:
            row = await blocking(save_label, root, row_id, body["rev"], body)
        except KeyError:
            return web.json_response({"error": f"no segment {row_id!r}"}, status=404)
        except StaleRowError as e:
            return web.json_response(
                {"error": "this segment was changed elsewhere; reloaded", "row": e.row},
                status=409,
            )
        except ValueError as e:
            return web.json_response({"error": str(e)}, status=400)
        except OSError as e:
            return web.json_response({"error": f"could not save: {e}"}, status=507)
        return web.json_response({"row": row})

    async def media(request: web.Request) -> web.StreamResponse:
        relative = request.match_info["path"]
        path = (root / relative).resolve()
        allowed = any(path.is_relative_to(root / folder) for folder in _MEDIA_FOLDERS)
        if not allowed or not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path)

    async def no_icon(_request: web.Request) -> web.StreamResponse:
        return web.Response(status=204)

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/favicon.ico", no_icon)
    app.router.add_get("/api/segments", segments)
    app.router.add_post("/api/segments/{id}", save)
    app.router.add_get("/media/{path:.+}", media)
    return app


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``smart-turn-mm label``."""
    parser.add_argument("dataset", metavar="DATASET_DIR", help="folder written by prepare")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8765, help="port (0: any free port)")
    parser.add_argument(
        "--tags",
        default=",".join(DEFAULT_TAGS),
        help="comma-separated visual tags, toggled with keys 1-9 (default: %(default)s)",
    )


def run(args: argparse.Namespace) -> int:
    """Serve the labelling page until interrupted."""
    try:
        from aiohttp import web
    except ImportError as e:
        raise ValueError(
            "the labelling page needs aiohttp: pip install 'smart-turn-mm[label]'"
        ) from e
    tags = [t.strip() for t in args.tags.split(",") if t.strip()][:9]
    app = make_app(args.dataset, tags)
    print(f"labelling {Path(args.dataset) / METADATA_NAME} at http://{args.host}:{args.port}/")
    print("keys: t/f/u = complete/incomplete/unlabelled, 1-9 = tags, j/k = next/previous")
    web.run_app(app, host=args.host, port=args.port, print=None)
    return 0
