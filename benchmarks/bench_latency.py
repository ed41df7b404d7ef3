"""Latency benchmark, ours vs the published method (same as ``smart-turn-mm bench``).

python benchmarks/bench_latency.py [--model EXPORT_DIR] [--runs 20] [--out benchmarks]
"""

import sys

from smart_turn_mm.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", *sys.argv[1:]]))
