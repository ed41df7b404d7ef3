"""The live web demo: microphone + camera in the browser, turn detection on this machine.

    python app_multimodal.py [-m model.onnx] [--port 8080]

then open http://127.0.0.1:8080/. Same options as ``smart-turn-mm demo``.
"""

import argparse
import sys

from smart_turn_mm.demo import server

if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        prog="app_multimodal.py", description=server.__doc__.split("\n")[0]
    )
    server.add_arguments(parser)
    raise SystemExit(server.run(parser.parse_args(sys.argv[1:])))
