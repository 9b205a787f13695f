"""The data entry point: the data flags every script shares, `build_loaders`, and a preview CLI.

Every source ends as one uint8 tensor (N, 3, 64, 64): aligned CelebA (celeba.py finds or downloads
it), any folder of images (image_folder.py decodes and caches it), or built-in synthetic faces
(synthetic.py). It is split 4:1 by a fixed permutation and served by `loader.TensorLoader` as float
batches in [-1, 1] on the training device.

    python dataset.py --dataset synthetic --max_images 64 --grid faces.png
"""
import torch
import torchvision.utils as vutils

import distributed
from celeba import find_celeba
from image_folder import load_folder
from loader import TensorLoader
from synthetic import DEFAULT_COUNT as SYNTHETIC_DEFAULT_COUNT, synthetic_faces
from utils import ArgParser, UserError, positive, run_cli

DATASETS = ("celeba", "folder", "synthetic")
DATA_DEFAULTS = dict(dataset="celeba", data_path="data", max_images=None, test_fraction=0.2,
                     batch_size=64, num_workers=4)
SPLIT_SEED = 0  # the train/test split is the same for every run, whatever --seed is


def load_images(dataset, data_path, max_images=None, num_workers=0, verbose=True):
    """The whole dataset as uint8 (N, 3, 64, 64), `max_images` limiting N before the split."""
    if dataset == "synthetic":
        return synthetic_faces(max_images or SYNTHETIC_DEFAULT_COUNT, seed=0)
    if dataset == "folder":
        return load_folder(data_path, max_images, num_workers, verbose)
    if dataset == "celeba":
        return load_folder(find_celeba(data_path), max_images, num_workers, verbose)
    raise UserError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")


def split_images(images, test_fraction=DATA_DEFAULTS["test_fraction"]):
    """Deterministic train/test split (default 4:1) by a fixed permutation: (train, test)."""
    if not 0 < test_fraction < 1:
        raise UserError(f"--test_fraction must be in (0, 1), got {test_fraction}")
    n = len(images)
    n_test = int(round(n * test_fraction))
    if n_test < 1 or n - n_test < 1:
        raise UserError(f"{n} images cannot be split into train and test with --test_fraction {test_fraction}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    return images[order[n_test:]], images[order[:n_test]]


def add_data_args(parser, inherit=False):
    """The data flags every script shares. With `inherit`, a flag left out takes the value the
    checkpoint's run used (see `inherit_data_args`)."""
    d = (lambda k: None) if inherit else DATA_DEFAULTS.get
    g = parser.add_argument_group("data" + (" (default: as in the checkpoint's run)" if inherit else ""))
    g.add_argument("--dataset", choices=DATASETS, default=d("dataset"), help="celeba, folder or synthetic")
    g.add_argument("--data_path", default=d("data_path"), help="CelebA root or image folder (data)")
    g.add_argument("--max_images", type=positive(int), default=d("max_images"),
                   help=f"use the first N images (synthetic default: {SYNTHETIC_DEFAULT_COUNT})")
    g.add_argument("--test_fraction", type=float, default=d("test_fraction"), help="test share of the 4:1 split")
    g.add_argument("--batch_size", type=positive(int), default=d("batch_size"), help="(64)")
    g.add_argument("--num_workers", type=int, default=d("num_workers"),
                   help="processes decoding images for the cache (4)")
    return g


def inherit_data_args(args, saved_args):
    """Fill the data flags left out (None) from a checkpoint's args, else the defaults."""
    for key, default in DATA_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, (saved_args or {}).get(key, default))


def build_loaders(args, device, shard=False):
    """(train_loader, test_loader) for the run's data flags; train is shuffled by --seed.

    On CUDA the images stay in GPU memory when they fit, unless --no_gpu_data. Under torchrun,
    rank 0 prepares the data (download, decoding, cache) before the others read it; with `shard`
    the train loader yields this process's part of every batch (--batch_size is the whole batch)."""
    several = distributed.world() > 1
    if several and not distributed.is_main():
        distributed.barrier()
    images = load_images(args.dataset, args.data_path, args.max_images, args.num_workers)
    if several and distributed.is_main():
        distributed.barrier()
    train, test = split_images(images, args.test_fraction)
    options = dict(resident=False if getattr(args, "no_gpu_data", False) else None,
                   channels_last=getattr(args, "channels_last", False))
    if shard and args.batch_size < distributed.world():
        raise UserError(f"--batch_size {args.batch_size} is smaller than the {distributed.world()} processes "
                        "sharing each batch")
    return (TensorLoader(train, args.batch_size, device, shuffle=True, seed=getattr(args, "seed", 0),
                         shard=(distributed.rank(), distributed.world()) if shard else (0, 1), **options),
            TensorLoader(test, args.batch_size, device, **options))


def get_args_parser():
    p = ArgParser("dataset.py", description="Decode (and cache) a dataset and save a grid of its images.")
    add_data_args(p)
    p.add_argument("--grid", default="samples.png", help="PNG to write (default: samples.png)")
    p.add_argument("--nrow", type=positive(int), default=8, help="images per row of the grid")
    return p


def main(args):
    images = load_images(args.dataset, args.data_path, args.max_images, args.num_workers)
    vutils.save_image(images[:args.nrow * args.nrow].float() / 255, args.grid, nrow=args.nrow)
    print(f"{len(images)} images of {tuple(images.shape[1:])}; grid of the first "
          f"{min(len(images), args.nrow ** 2)} written to {args.grid}")


if __name__ == "__main__":
    run_cli(main, get_args_parser())
