"""Predict end of turn from audio (+ optional video): the published command line.

    python inference_multimodal.py -a turn.wav [-v face.mp4] [-m model.onnx] [--json]

Same options as ``smart-turn-mm predict``.
"""

import sys

from smart_turn_mm.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["predict", *sys.argv[1:]]))
