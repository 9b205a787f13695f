"""The images of a run as one in-memory uint8 tensor (N, 3, 64, 64), split and served in batches.

Every source ends as that tensor: aligned CelebA (`celeba` finds or downloads it), any folder of
images (`folder` decodes and caches it), or built-in synthetic faces (`synthetic`). It is split
4:1 by a fixed permutation and served by `loader.TensorLoader` as float batches in [-1, 1] on the
training device.

Example::
    >>> train, test = build_loaders(Data(dataset="synthetic", max_images=400), torch.device("cpu"))
"""
from typing import NamedTuple

import torch

from aemc import distributed
from aemc.data.celeba import find_celeba
from aemc.data.folder import load_folder
from aemc.data.loader import TensorLoader
from aemc.data.synthetic import DEFAULT_COUNT as SYNTHETIC_DEFAULT_COUNT
from aemc.data.synthetic import synthetic_faces
from aemc.errors import UserError
from aemc.settings import Data, Speed

DATASETS = ("celeba", "folder", "synthetic")
SPLIT_SEED = 0  # the train/test split is the same for every run, whatever its seed


class Loaders(NamedTuple):
    train: TensorLoader
    test: TensorLoader


def load_images(data, verbose=True):
    """The whole dataset of `data` (a Data) as uint8 (N, 3, 64, 64), `max_images` limiting N
    before the split."""
    if data.dataset == "synthetic":
        return synthetic_faces(data.max_images or SYNTHETIC_DEFAULT_COUNT, seed=0)
    if data.dataset == "folder":
        return load_folder(data.data_path, data.max_images, data.num_workers, verbose)
    if data.dataset == "celeba":
        return load_folder(find_celeba(data.data_path), data.max_images, data.num_workers, verbose)
    raise UserError(f"unknown dataset {data.dataset!r}; choose from {', '.join(DATASETS)}")


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
    images = load_images(data)
    if several and distributed.is_main():
        distributed.barrier()
    train, test = split_images(images, data.test_fraction)
    options = dict(resident=None if speed.gpu_data else False, channels_last=speed.channels_last)
    if shard and data.batch_size < distributed.world():
        raise UserError(f"--batch_size {data.batch_size} is smaller than the {distributed.world()} processes "
                        "sharing each batch")
    return Loaders(TensorLoader(train, data.batch_size, device, shuffle=True, seed=seed,
                                shard=(distributed.rank(), distributed.world()) if shard else (0, 1), **options),
                   TensorLoader(test, data.batch_size, device, **options))
