"""Train RepLKNet (tiny by default) on a synthetic dataset with lkconv, then deploy it.

    python examples/train_replknet.py --steps 30
    torchrun --nproc_per_node 2 examples/train_replknet.py --steps 30          # DDP (gloo / nccl)
    python examples/train_replknet.py --model 31b --image-size 224 --batch-size 64 --device cuda

All options: ``python examples/train_replknet.py --help`` (the same as ``python -m lkconv train``).
"""
import sys

from lkconv.models.train import main

if __name__ == "__main__":
    sys.exit(main())
