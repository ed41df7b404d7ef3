"""Export a checkpoint to validated fp32 + int8 ONNX files (the published file names).

    python export_onnx.py --checkpoint CKPT_DIR --out OUT_DIR --calibration-dir DATASET

The same as ``smart-turn-mm export``; see ``smart_turn_mm.export`` for what is written and
checked. Exits 1 when validation fails (the files and a FAILED report are kept).
"""

from __future__ import annotations

import argparse
import sys

from smart_turn_mm.export import add_export_arguments, run_export_from_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_export_arguments(parser)
    return run_export_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
