"""The data: the flags every script shares, the Data settings they make, the loaders built from
them (`build_loaders`), and a preview CLI.

Every source ends as uint8 tensors (N, C, H, W): aligned CelebA (found or downloaded), any folder
of images (decoded once and cached), built-in synthetic faces, MNIST, Fashion-MNIST or CIFAR-10
(through torchvision); split and served as float batches in [-1, 1] on the training device (see
aemc.data).

    python dataset.py --dataset synthetic --max_images 64 --grid faces.png
"""
from aemc.cli import ArgParser, positive, run_cli
from aemc.data import DATASETS, SYNTHETIC_DEFAULT_COUNT, build_loaders, load_images, load_splits, split_images  # noqa: F401
from aemc.settings import Data, flag_text


def add_data_args(parser, inherit=False, title="data (default: as in the checkpoint's run)"):
    """The data flags every script shares. With `inherit`, a flag left out is None: it takes the value
    the checkpoint's run used (see `data_settings`); the help says `title` and the typed defaults."""
    d = (lambda k: None) if inherit else (lambda k: getattr(Data, k))
    g = parser.add_argument_group(title if inherit else "data")
    g.add_argument("--dataset", choices=DATASETS, default=d("dataset"),
                   help="celeba, folder, synthetic, mnist, fashion_mnist or cifar10, see docs/data.md "
                        f"({Data.dataset})")
    g.add_argument("--data_path", default=d("data_path"), help=f"CelebA root or image folder ({Data.data_path})")
    g.add_argument("--max_images", type=positive(int), default=d("max_images"),
                   help=f"use the first N images (synthetic default: {SYNTHETIC_DEFAULT_COUNT})")
    g.add_argument("--test_fraction", type=float, default=d("test_fraction"),
                   help=f"test share of the fixed split ({Data.test_fraction})")
    g.add_argument("--batch_size", type=positive(int), default=d("batch_size"),
                   help=f"images per training step ({Data.batch_size})")
    g.add_argument("--num_workers", type=int, default=d("num_workers"),
                   help=f"processes decoding images for the cache ({Data.num_workers})")
    g.add_argument("--image_size", type=positive(int), default=d("image_size"),
                   help="the side of the square images (synthetic, folder, celeba: 64; mnist, fashion_mnist, cifar10: "
                        "their own, or resized to this)")
    g.add_argument("--channels", type=int, choices=(1, 3), default=d("channels"),
                   help="synthetic, folder, celeba: 3 (RGB, default) or 1 (grey)")
    g.add_argument("--random_split", dest="native_split", action="store_false", default=None if inherit else True,
                   help="mnist, fashion_mnist, cifar10: the fixed 4:1 split of all images instead of the "
                        "dataset's own train/test split")
    return g


def data_settings(args, inherited=None):
    """The Data of a run: the data flags given, else those of `inherited` (the checkpoint's run),
    else the defaults."""
    flags = {name: getattr(args, name) for name in Data.__dataclass_fields__ if getattr(args, name) is not None}
    return Data(**{**vars(inherited or Data()), **flags})


def data_flags(data, names=None):
    """`data`'s settings as the flags that give them ("--dataset synthetic --max_images 64 ..."), those
    in `names` only; unset ones (None) and the dataset's own split (the default) are left out."""
    words = []
    for name, value in vars(data).items():
        if names is not None and name not in names or value is None:
            continue
        if name != "native_split" or not value:
            words.append(flag_text(name, value))
    return " ".join(words)


def report_inherited(args, data, whose):
    """Print one line naming the data settings `data` took from `whose` run for the flags left out
    (nothing when every flag was given)."""
    left_out = [name for name in Data.__dataclass_fields__ if getattr(args, name, None) is None]
    words = data_flags(data, left_out)
    if words:
        print(f"data as in {whose}: {words}")


def get_args_parser():
    p = ArgParser("dataset.py", description="Decode (and cache) a dataset and save a grid of its images.")
    add_data_args(p)
    p.add_argument("--grid", default="samples.png", help="PNG to write (default: samples.png)")
    p.add_argument("--nrow", type=positive(int), default=8, help="images per row of the grid")
    return p


def main(args):
    import torchvision.utils as vutils  # seconds to import: only for the preview
    images = load_images(data_settings(args))
    vutils.save_image(images[:args.nrow * args.nrow].float() / 255, args.grid, nrow=args.nrow)
    print(f"{len(images)} images of {tuple(images.shape[1:])}; grid of the first "
          f"{min(len(images), args.nrow ** 2)} written to {args.grid}")


if __name__ == "__main__":
    run_cli(main, get_args_parser())
