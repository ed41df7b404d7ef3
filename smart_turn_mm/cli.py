"""The ``smart-turn-mm`` command line.

Each sub-command lives in its own module with ``add_arguments(parser)`` and ``run(args) -> int``.
Only the chosen sub-command's module is imported, so ``smart-turn-mm predict`` never imports
torch.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence

# name -> (module, its add-arguments function, its run function, help).
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "predict": (
        "smart_turn_mm.cli",
        "add_arguments",
        "run",
        "decide whether a turn is complete (audio + optional video)",
    ),
    "export": (
        "smart_turn_mm.export",
        "add_export_arguments",
        "run_export_from_args",
        "export a checkpoint to fp32 and int8 ONNX, validated",
    ),
    "train": (
        "smart_turn_mm.train",
        "add_train_arguments",
        "run_train_from_args",
        "train a model (two-stage recipe)",
    ),
    "evaluate": (
        "smart_turn_mm.evaluate",
        "add_evaluate_arguments",
        "run_evaluate_from_args",
        "evaluate a checkpoint or ONNX model on a dataset",
    ),
    "bench": (
        "smart_turn_mm.bench",
        "add_arguments",
        "run",
        "latency benchmark vs the published method (CPU, and CUDA when present)",
    ),
    "replay": (
        "smart_turn_mm.replay",
        "add_arguments",
        "run",
        "stream a recording through the real-time detector and print the event timeline",
    ),
    "demo": (
        "smart_turn_mm.demo.server",
        "add_arguments",
        "run",
        "live web demo: microphone + camera in the browser",
    ),
    "prepare": (
        "smart_turn_mm.prepare",
        "add_arguments",
        "run",
        "turn a folder of talking-head videos into a training folder (VAD, face crop)",
    ),
    "autolabel": (
        "smart_turn_mm.autolabel",
        "add_arguments",
        "run",
        "fill endpoint_bool in a prepared dataset from a rule, with a change log",
    ),
    "label": (
        "smart_turn_mm.label_app",
        "add_arguments",
        "run",
        "labelling web page for a prepared dataset (keyboard, atomic saves)",
    ),
    "stats": (
        "smart_turn_mm.stats",
        "add_arguments",
        "run",
        "dataset statistics with a PNG histogram",
    ),
    "quickstart": (
        "smart_turn_mm.quickstart",
        "add_arguments",
        "run",
        "offline end-to-end run: data, train, evaluate, export, predict",
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``predict`` (also the published ``inference_multimodal.py`` command line)."""
    parser.add_argument(
        "-a", "--audio", required=True, help="audio file (any PyAV-readable format)"
    )
    parser.add_argument("-v", "--video", help="video file (optional; face-cropped automatically)")
    parser.add_argument(
        "-m",
        "--model",
        help="ONNX file, export directory or Hub repo id "
        "(default: $SMART_TURN_MM_MODEL, the Hub, then pipecat-ai's bundled v3.2)",
    )
    parser.add_argument("--threshold", type=float, default=0.5, help="decision threshold")
    parser.add_argument(
        "--no-face-crop", action="store_true", help="the video is already face-cropped"
    )
    parser.add_argument("--precision", choices=("auto", "fp32", "int8"), default="auto")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    from smart_turn_mm.inference import load_model, predict_endpoint

    model = load_model(args.model, threads=args.threads, precision=args.precision)
    result = predict_endpoint(
        args.audio,
        args.video,
        model=model,
        threshold=args.threshold,
        face_crop=not args.no_face_crop,
    )
    if args.json:
        print(json.dumps({**dict(result), "timings_ms": dict(result.timings_ms)}, indent=2))
        return 0
    verdict = "COMPLETE (end of turn)" if result.prediction else "INCOMPLETE (keep listening)"
    print(f"model:        {model.path}")
    print(f"prediction:   {result.prediction}  {verdict}")
    print(f"probability:  {result.probability:.4f}  (threshold {args.threshold})")
    video = "no"
    if result.used_video:
        video = "yes, face found" if result.face_found else "yes, no face (centre crop)"
    print(f"video used:   {video}")
    timings = "  ".join(f"{k.removesuffix('_ms')} {v:.1f} ms" for k, v in result.timings_ms.items())
    print(f"timings:      {timings}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="smart-turn-mm", description="Audio-visual end-of-turn detection for voice AI."
    )
    from smart_turn_mm import __version__

    parser.add_argument("--version", action="version", version=f"smart-turn-mm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, add_name, run_name, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            getattr(module, add_name)(sp)
            sp.set_defaults(_run=getattr(module, run_name))
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"smart-turn-mm {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
