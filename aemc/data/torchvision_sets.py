"""MNIST, Fashion-MNIST and CIFAR-10 through torchvision (downloaded into --data_path when missing),
decoded once into uint8 tensors (N, C, H, W) at their own size and cached beside them.

Without network, a missing dataset is one line naming the folder and the files torchvision reads
there, so a copy made elsewhere can be put in place.
"""
import os

import numpy as np
import torch

from aemc.errors import UserError, warn
from aemc.files import atomic_write

SETS = {
    "mnist": ("MNIST", os.path.join("MNIST", "raw"),
              ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")),
    "fashion_mnist": ("FashionMNIST", os.path.join("FashionMNIST", "raw"),
                      ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                       "t10k-labels-idx1-ubyte")),
    "cifar10": ("CIFAR10", "cifar-10-batches-py",
                ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
                 "batches.meta")),
}
CACHE_VERSION = 1


def write_idx_images(path, images):
    """MNIST's idx3-ubyte format (what torchvision's MNIST reads): magic 2051, count, rows, cols
    (big-endian int32), then the uint8 pixels of `images` (N, H, W)."""
    n, h, w = images.shape
    with atomic_write(path, "wb") as f:
        f.write(np.array([2051, n, h, w], dtype=">i4").tobytes() + np.asarray(images, dtype=np.uint8).tobytes())


def write_idx_labels(path, labels):
    """MNIST's idx1-ubyte format: magic 2049, count (big-endian int32), then the uint8 labels."""
    with atomic_write(path, "wb") as f:
        f.write(np.array([2049, len(labels)], dtype=">i4").tobytes() + np.asarray(labels, dtype=np.uint8).tobytes())


def load_split(name, root, train, download=True):
    """The images of the `train` (or test) split of dataset `name` as uint8 (N, C, H, W)."""
    cache = os.path.join(root, f".cache-{name}-{'train' if train else 'test'}.pt")
    if os.path.exists(cache):
        try:
            saved = torch.load(cache, map_location="cpu", weights_only=True)
            if saved.get("version") == CACHE_VERSION:
                return saved["images"]
        except Exception:
            warn(f"image cache {cache} is unreadable; rebuilding")
    images = _decode(name, root, train, download)
    try:
        os.makedirs(root, exist_ok=True)
        with atomic_write(cache) as f:
            torch.save({"version": CACHE_VERSION, "images": images}, f)
    except OSError as e:
        warn(f"warning: cannot write image cache {cache} ({e.strerror}); the images will be decoded again next run")
    return images


def _decode(name, root, train, download):
    import torchvision.datasets as tvd
    class_name, folder, files = SETS[name]
    try:
        dataset = getattr(tvd, class_name)(root, train=train, download=download)
    except Exception as e:  # torchvision raises RuntimeError, URLError, ... : which, the text says
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{name} is not under {os.path.join(root, folder)} and could not be downloaded ({reason}); "
                        f"put torchvision's files there ({', '.join(files)}) or check the network")
    data = dataset.data
    data = torch.as_tensor(np.asarray(data))
    if data.dim() == 3:                   # MNIST-like: (N, H, W) grey
        return data.unsqueeze(1).contiguous()
    return data.permute(0, 3, 1, 2).contiguous()  # CIFAR: (N, H, W, C)
