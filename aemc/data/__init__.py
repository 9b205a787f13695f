"""The images of a run as in-memory uint8 tensors (N, C, H, W), split and served in batches.

Every source ends as such a tensor: aligned CelebA (`celeba` finds or downloads it), any folder of
images (`folder` decodes and caches it), built-in synthetic faces (`synthetic`), all 64x64 RGB
unless asked otherwise (--image_size, --channels 1); MNIST, Fashion-MNIST and CIFAR-10
(`torchvision_sets`) at their own size and channels, or resized to --image_size (a conv VAE needs a
power of two: MNIST's 28 becomes 32), split as the datasets are (or 4:1 with --random_split).
The others are split 4:1 by a fixed permutation. `loader.TensorLoader` serves float batches in
[-1, 1] on the training device.

Example::
    >>> train, test = build_loaders(Data(dataset="synthetic", max_images=400), torch.device("cpu"))
"""
import os
from typing import NamedTuple

import torch

from aemc import distributed
from aemc.data.celeba import find_celeba
from aemc.data.folder import IMAGE_SIZE, load_folder
from aemc.data.loader import TensorLoader
from aemc.data.synthetic import DEFAULT_COUNT as SYNTHETIC_DEFAULT_COUNT
from aemc.data.synthetic import synthetic_faces
from aemc.data.torchvision_sets import SETS, load_split
from aemc.errors import UserError
from aemc.settings import Data, Speed

DATASETS = ("celeba", "folder", "synthetic", "mnist", "fashion_mnist", "cifar10")
SPLIT_SEED = 0  # the train/test split is the same for every run, whatever its seed


class Loaders(NamedTuple):
    train: TensorLoader
    test: TensorLoader


def load_images(data, verbose=True):
    """The whole dataset of `data` (a Data) as uint8 (N, C, H, W), `max_images` limiting N before
    the split (for a dataset with a split of its own: both splits, train first)."""
    check_data_path(data)
    if data.dataset in SETS:
        return torch.cat(load_splits(data, verbose))
    size, channels = data.image_size or IMAGE_SIZE, data.channels or 3
    if channels not in (1, 3):
        raise UserError(f"--channels {channels}: images are RGB (3) or grey (1)")
    if data.dataset == "synthetic":
        faces = synthetic_faces(data.max_images or SYNTHETIC_DEFAULT_COUNT, seed=0, size=size)
        return faces if channels == 3 else grey(faces)
    if data.dataset == "folder":
        return load_folder(data.data_path, data.max_images, data.num_workers, verbose, size, channels)
    if data.dataset == "celeba":
        return load_folder(find_celeba(data.data_path), data.max_images, data.num_workers, verbose, size, channels)
    raise UserError(f"unknown dataset {data.dataset!r}; choose from {', '.join(DATASETS)}")


def check_data_path(data):
    """--data_path names a folder (or one yet to be made), never a file."""
    if data.dataset != "synthetic" and data.data_path and os.path.exists(data.data_path) \
            and not os.path.isdir(data.data_path):
        raise UserError(f"--data_path {data.data_path} is a file; --dataset {data.dataset} needs a folder "
                        "(where the dataset is, or where to put it)")


def grey(images):
    """uint8 RGB (N, 3, H, W) -> uint8 luminance (N, 1, H, W) (ITU-R 601 weights, as PIL's "L")."""
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (images.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)


def load_splits(data, verbose=True):
    """(train, test) uint8 tensors of `data`: a dataset's own split, or the fixed 4:1 split."""
    check_data_path(data)
    if data.dataset not in SETS:
        return split_images(load_images(data, verbose), data.test_fraction)
    if data.channels is not None:
        raise UserError(f"--dataset {data.dataset} comes with its own channels: drop --channels")
    train, test = (load_split(data.dataset, data.data_path, is_train) for is_train in (True, False))
    if not data.native_split:
        both = torch.cat([train, test])
        train, test = split_images(both if data.max_images is None else both[:data.max_images], data.test_fraction)
    elif data.max_images is not None:  # the first N images, shared as the split is
        n_test = int(round(data.max_images * data.test_fraction))
        train, test = train[:data.max_images - n_test], test[:n_test]
    return resized(train, data.image_size), resized(test, data.image_size)


def resized(images, size):
    """uint8 (N, C, H, W) resized to (N, C, size, size) (antialiased bilinear, as PIL resizes down
    and torchvision's Resize does); unchanged when `size` is None or already theirs."""
    if size is None or images.shape[-2:] == (size, size):
        return images
    out = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True,
                                          align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


def split_images(images, test_fraction=Data.test_fraction):
    """Deterministic train/test split (default 4:1) by a fixed permutation: (train, test)."""
    if not 0 < test_fraction < 1:
        raise UserError(f"--test_fraction must be in (0, 1), got {test_fraction}")
    n = len(images)
    n_test = int(round(n * test_fraction))
    if n_test < 1 or n - n_test < 1:
        raise UserError(f"{n} images cannot be split into train and test with --test_fraction {test_fraction}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    return images[order[n_test:]], images[order[:n_test]]


def build_loaders(data, device, *, seed=0, speed=Speed(), shard=False):
    """Loaders(train, test) for `data` (a Data); the training batches are shuffled by `seed`.

    On CUDA the images stay in GPU memory when they fit, unless `speed.gpu_data` is off. Under
    torchrun, rank 0 prepares the data (download, decoding, cache) before the others read it; with
    `shard` the train loader yields this process's part of every batch (`data.batch_size` is the
    whole batch)."""
    several = distributed.world() > 1
    if several and not distributed.is_main():
        distributed.barrier()
    train, test = load_splits(data)
    if several and distributed.is_main():
        distributed.barrier()
    options = dict(resident=None if speed.gpu_data else False, channels_last=speed.channels_last)
    if shard and data.batch_size < distributed.world():
        raise UserError(f"--batch_size {data.batch_size} is smaller than the {distributed.world()} processes "
                        "sharing each batch")
    return Loaders(TensorLoader(train, data.batch_size, device, shuffle=True, seed=seed,
                                shard=(distributed.rank(), distributed.world()) if shard else (0, 1), **options),
                   TensorLoader(test, data.batch_size, device, **options))
