"""Train Smart Turn Multimodal with the two-stage recipe (``smart_turn_mm.train``).

    python train_multimodal.py --data-dir data/casual_conversations_v3 \
        --audio-datasets pipecat-ai/smart-turn-data-v3.2-train --output-dir runs/mm
    torchrun --nproc_per_node 4 train_multimodal.py ...        # several GPUs (DDP)
    python train_multimodal.py --config runs/mm/train_config.json --resume

Same options as ``smart-turn-mm train``; ``--help`` lists them.
"""

import argparse

from smart_turn_mm.train import add_train_arguments, run_train_from_args

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_train_arguments(parser)
    raise SystemExit(run_train_from_args(parser.parse_args()))
