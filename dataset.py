"""Images for the autoencoders: aligned CelebA, any folder of images, or built-in synthetic faces.

Every source ends as one uint8 tensor (N, 3, 64, 64), decoded once and cached on disk next to the
data (a cache whose source, preprocessing or version changed is rebuilt). Batches are sliced from
that tensor by `TensorLoader` and converted to float in [-1, 1] on the training device.
"""
import hashlib
import math
import os
import shutil
import sys
import zipfile

import torch
from tqdm import tqdm

from utils import ArgParser, UserError, file_digest, positive, run_cli

DATASETS = ("celeba", "folder", "synthetic")
IMAGE_SIZE = 64
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SYNTHETIC_DEFAULT_COUNT = 10_000
SPLIT_SEED = 0  # the train/test split is the same for every run, whatever --seed is

# Aligned CelebA as torchvision downloads it (Google Drive file of img_align_celeba.zip).
CELEBA_DRIVE_ID = "0B7EVK8r0v71pZjFTYXZWM3FlRnM"
CELEBA_MD5 = "00d2c5bc6d35e252742224ab0c1e8fcb"
CELEBA_MANUAL = (
    "get aligned CelebA by hand and pass its folder with --data_path: either an extracted "
    "img_align_celeba/ folder (or img_align_celeba.zip) inside it, torchvision's layout "
    "(<data_path>/celeba/img_align_celeba/), or Kaggle's jessicali9530/celeba-dataset unzipped "
    "there; or use --dataset folder / --dataset synthetic")

CACHE_VERSION = 1
PREPROCESS = f"PIL RGB; resize shorter side to {IMAGE_SIZE} (bilinear, antialiased); center crop {IMAGE_SIZE}"


# ----------------------------------------------------------------------------- synthetic faces

def _palette(rand, colours, jitter):
    """Pick one of `colours` per image and jitter it: (n, 3) in [0, 1]."""
    colours = torch.tensor(colours)
    idx = (rand(1).squeeze(1) * len(colours)).long().clamp(max=len(colours) - 1)
    return (colours[idx] + jitter * (rand(3) * 2 - 1)).clamp(0, 1)


def _ellipse(x, y, cx, cy, rx, ry, px):
    """Anti-aliased coverage in [0, 1] of the ellipse ((x-cx)/rx)^2 + ((y-cy)/ry)^2 <= 1."""
    d = torch.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    edge = px / torch.minimum(rx, ry)  # one pixel, in units of the normalised radius
    return ((1 - d) / edge + 0.5).clamp(0, 1)


def _paint(img, alpha, colour):
    """Composite `colour` (n, 3) over img (n, 3, H, W) with coverage alpha (n, H, W)."""
    a = alpha.unsqueeze(1)
    return img * (1 - a) + colour[:, :, None, None] * a


def synthetic_faces(count, seed=0, size=IMAGE_SIZE, chunk=256):
    """Procedurally drawn RGB faces, uint8 (count, 3, size, size); the same for the same seed.

    Each face has a background (flat or a vertical gradient), hair behind the head and a fringe,
    neck and shoulders, a skin-toned oval with soft shading, eyes (white, iris, pupil), brows,
    a nose shadow and a mouth; it is shifted, rotated and scaled at random. All drawing is
    vectorised over the images of a chunk.
    """
    out = torch.empty(count, 3, size, size, dtype=torch.uint8)
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    v, u = torch.meshgrid(coords, coords, indexing="ij")  # v: down, u: right, in [-1, 1]
    for start in range(0, count, chunk):
        n = min(chunk, count - start)
        # every chunk draws for `chunk` images from its own generator and keeps the first n, so
        # the first N faces are the same whatever the count (like the first N files of a folder)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + start // chunk)

        def rand(*shape):
            return torch.rand(chunk, *shape, generator=gen)[:n]

        def r(lo, hi):  # one uniform number per image, shaped (n, 1, 1) to broadcast over pixels
            return lo + (hi - lo) * rand(1, 1)
        # pose: shift, rotation (radians), scale; map pixel coords into face coords
        angle, scale = r(-0.26, 0.26), r(0.85, 1.12)
        du, dv = r(-0.1, 0.1), r(-0.08, 0.1)
        cos, sin = torch.cos(angle), torch.sin(angle)
        x = (cos * (u - du) + sin * (v - dv)) / scale
        y = (-sin * (u - du) + cos * (v - dv)) / scale
        px = 2.0 / size / scale  # one pixel in face units

        bg_top = rand(3) * 0.8 + 0.1
        bg_bottom = torch.where(rand(1) < 0.5, bg_top, rand(3) * 0.8 + 0.1)
        g = ((v + 1) / 2)[None, None]  # vertical gradient weight (1, 1, H, W)
        img = bg_top[:, :, None, None] * (1 - g) + bg_bottom[:, :, None, None] * g

        skin_t = rand(1)
        skin = (torch.tensor([0.96, 0.80, 0.69]) * (1 - skin_t) + torch.tensor([0.40, 0.25, 0.17]) * skin_t
                + 0.05 * (rand(3) * 2 - 1)).clamp(0, 1)
        hair = _palette(rand, [[0.08, 0.06, 0.05], [0.30, 0.18, 0.09], [0.82, 0.66, 0.38],
                                 [0.55, 0.22, 0.08], [0.62, 0.62, 0.62]], 0.06)
        clothes = rand(3) * 0.9
        iris = _palette(rand, [[0.30, 0.18, 0.08], [0.25, 0.45, 0.70], [0.30, 0.50, 0.30]], 0.08)
        lips = (skin * torch.tensor([0.85, 0.55, 0.55]) + torch.tensor([0.12, 0.0, 0.0])).clamp(0, 1)

        fw, fh = r(0.40, 0.50), r(0.55, 0.66)  # face half-width and half-height
        hair_len = r(-0.1, 0.75)               # how far down the hair falls behind the head
        zero = torch.zeros(n, 1, 1)
        # shoulders, neck, hair behind the head
        img = _paint(img, _ellipse(x, y, zero, zero + 1.25, fw * 2.0, zero + 0.55, px), clothes)
        neck = ((fw * 0.5 - x.abs()) / px + 0.5).clamp(0, 1) * ((y - 0.2) / px).clamp(0, 1)
        img = _paint(img, neck, skin * 0.8)
        back = _ellipse(x, y, zero, zero - 0.1, fw * 1.25, fh * 1.15, px) * ((hair_len - y) / px).clamp(0, 1)
        img = _paint(img, back, hair * 0.85)
        # face oval with soft shading towards the rim
        face = _ellipse(x, y, zero, zero, fw, fh, px)
        rim = ((x / fw) ** 2 + (y / fh) ** 2).clamp(0, 1).unsqueeze(1)
        shade = skin[:, :, None, None] * (1 - 0.22 * rim)
        img = img * (1 - face.unsqueeze(1)) + shade * face.unsqueeze(1)
        # fringe: hair over the top of the face, with a wavy hairline
        hairline = -fh * r(0.45, 0.75) + 0.05 * torch.sin(x * r(3, 9))
        fringe = face * ((hairline - y) / px + 0.5).clamp(0, 1)
        img = _paint(img, fringe, hair)
        # eyes, brows, nose, mouth
        ex, ey = fw * r(0.38, 0.48), fh * r(-0.12, 0.0)
        for side in (-1, 1):
            img = _paint(img, _ellipse(x, y, side * ex, ey, fw * 0.2, fh * 0.08, px), torch.full((n, 3), 0.95))
            img = _paint(img, _ellipse(x, y, side * ex, ey, fw * 0.09, fh * 0.075, px), iris)
            img = _paint(img, _ellipse(x, y, side * ex, ey, fw * 0.04, fh * 0.035, px), torch.full((n, 3), 0.03))
            arch = 0.06 * ((x - side * ex) / fw) ** 2  # brows curve down at their ends
            brow = _ellipse(x, y - arch, side * ex, ey - fh * r(0.16, 0.22), fw * 0.24, fh * 0.035, px)
            img = _paint(img, brow, hair * 0.7)
        img = _paint(img, 0.5 * _ellipse(x, y, zero + fw * 0.05, fh * 0.15, fw * 0.1, fh * 0.2, px), skin * 0.7)
        smile = r(-0.25, 0.6) * (x / fw) ** 2 * fh
        mouth_y = fh * r(0.48, 0.56)
        img = _paint(img, _ellipse(x, y + smile, zero, mouth_y, fw * r(0.28, 0.42), fh * r(0.05, 0.1), px), lips)
        img = img + 0.02 * (rand(3, size, size) - 0.5)  # faint sensor noise
        out[start:start + n] = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return out


# ----------------------------------------------------------------------------- image folders

def list_images(root):
    """Image files under `root` (recursively, hidden entries skipped), sorted, relative paths."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTS):
                found.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(found)


def decode_image(path, size=IMAGE_SIZE):
    """One image file -> uint8 (3, size, size): RGB, shorter side resized to `size`, centre crop."""
    from PIL import Image
    import torchvision.transforms.functional as TF
    with Image.open(path) as im:
        im = im.convert("RGB")  # greyscale, palette and RGBA (alpha dropped) all become RGB
        im = TF.center_crop(TF.resize(im, size), size)
        return TF.pil_to_tensor(im)


class _DecodeFiles(torch.utils.data.Dataset):
    def __init__(self, root, files):
        self.root, self.files = root, files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            return decode_image(os.path.join(self.root, self.files[i])), True
        except Exception:  # unreadable or truncated file: skipped and counted by the caller
            return torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8), False


def _source_signature(root, files):
    """Fingerprint of the files a cache was built from: names, sizes and modification times."""
    h = hashlib.sha256()
    for rel in files:
        st = os.stat(os.path.join(root, rel))
        h.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def load_folder(root, max_images=None, num_workers=0, verbose=True):
    """All images under `root` as uint8 (N, 3, 64, 64), via a cache file inside `root`.

    The cache (`root/.cache-64px-<N>.pt`) records the file list signature, the preprocessing and
    the cache version; when any differs from the folder now, it is rebuilt.
    """
    if not os.path.isdir(root):
        raise UserError(f"image folder {root} does not exist; check --data_path")
    files = list_images(root)
    if not files:
        raise UserError(f"no images ({', '.join(IMAGE_EXTS)}) found under {root}; check --data_path")
    if max_images is not None:
        files = files[:max_images]
    meta = dict(version=CACHE_VERSION, preprocess=PREPROCESS, count=len(files),
                signature=_source_signature(root, files))
    cache = os.path.join(root, f".cache-{IMAGE_SIZE}px-{len(files)}.pt")
    if os.path.exists(cache):
        try:
            saved = torch.load(cache, map_location="cpu", weights_only=True, mmap=True)
            if saved.get("meta") == meta:
                return saved["images"]
            changed = [k for k in meta if saved.get("meta", {}).get(k) != meta[k]]
            reason = f"{', '.join(changed)} changed"
        except Exception:
            reason = "unreadable"
        print(f"image cache {cache} is stale ({reason}); rebuilding", file=sys.stderr)

    images = torch.empty(len(files), 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    ok = torch.empty(len(files), dtype=torch.bool)
    loader = torch.utils.data.DataLoader(_DecodeFiles(root, files), batch_size=256,
                                         num_workers=num_workers)
    pos = 0
    for batch, good in tqdm(loader, desc=f"decoding {len(files)} images", unit="batch",
                            disable=not verbose):
        images[pos:pos + len(batch)], ok[pos:pos + len(batch)] = batch, good
        pos += len(batch)
    if not ok.all():
        bad = [f for f, g in zip(files, ok.tolist()) if not g]
        print(f"warning: skipped {len(bad)} unreadable image file(s) under {root} "
              f"(first: {bad[0]})", file=sys.stderr)
        images = images[ok]
    if len(images) == 0:
        raise UserError(f"none of the {len(files)} image files under {root} could be read")
    tmp = f"{cache}.tmp-{os.getpid()}"
    try:
        torch.save({"meta": meta, "images": images}, tmp)
        os.replace(tmp, cache)
    except OSError as e:  # read-only data folder: work without a cache
        print(f"warning: cannot write image cache {cache} ({e.strerror}); "
              "images will be decoded again next run", file=sys.stderr)
        if os.path.exists(tmp):
            os.remove(tmp)
    return images


# ----------------------------------------------------------------------------- CelebA

def _dir_has_images(path):
    if not os.path.isdir(path):
        return False
    for _, _, filenames in os.walk(path):
        if any(f.lower().endswith(IMAGE_EXTS) for f in filenames):
            return True
    return False


def find_celeba(data_path, download=True):
    """The folder of aligned CelebA images under `data_path`, extracting or downloading it if needed.

    Looks for, in order: <data_path>/img_align_celeba/ (also Kaggle's nested layout),
    <data_path>/celeba/img_align_celeba/ (torchvision), <data_path> itself when it is that folder,
    then img_align_celeba.zip in either place (extracted next to it); otherwise downloads the zip.
    """
    folders = [os.path.join(data_path, "img_align_celeba"),
               os.path.join(data_path, "celeba", "img_align_celeba")]
    for folder in folders:
        if _dir_has_images(folder):
            return folder
    if os.path.basename(os.path.normpath(data_path)) == "img_align_celeba" and _dir_has_images(data_path):
        return data_path
    for folder in folders:
        if os.path.isfile(folder + ".zip"):
            return extract_zip(folder + ".zip")
    if not download:
        raise UserError(f"aligned CelebA not found under {data_path}; {CELEBA_MANUAL}")
    return extract_zip(download_celeba(data_path))


def extract_zip(zip_path):
    """Extract img_align_celeba.zip beside itself, via a temporary folder renamed at the end."""
    parent = os.path.dirname(os.path.abspath(zip_path))
    target = os.path.join(parent, "img_align_celeba")
    tmp = os.path.join(parent, ".img_align_celeba.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with zipfile.ZipFile(zip_path) as zf:
            members = zf.infolist()
            for m in tqdm(members, desc=f"extracting {os.path.basename(zip_path)}", unit="file"):
                zf.extract(m, tmp)
    except (zipfile.BadZipFile, OSError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot extract {zip_path} ({e}); delete it and retry, or {CELEBA_MANUAL}")
    inner = os.path.join(tmp, "img_align_celeba")  # the zip holds an img_align_celeba/ folder
    os.replace(inner if os.path.isdir(inner) else tmp, target)
    shutil.rmtree(tmp, ignore_errors=True)
    return target


def download_celeba(data_path):
    """Download img_align_celeba.zip (1.4 GB) from Google Drive with gdown; returns its path.

    Written to a temporary name, checked (a zip, with the known MD5), then renamed. On any
    failure nothing partial is left behind and the error names the manual options.
    """
    import gdown
    os.makedirs(data_path, exist_ok=True)
    final = os.path.join(data_path, "img_align_celeba.zip")
    tmp = final + ".part"
    before = set(os.listdir(data_path))

    def fail(reason):
        for name in set(os.listdir(data_path)) - before:  # gdown's own temporaries too
            path = os.path.join(data_path, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        raise UserError(f"could not download CelebA: {reason}; {CELEBA_MANUAL}")

    print(f"downloading aligned CelebA (1.4 GB) into {data_path} ...", file=sys.stderr)
    try:
        gdown.download(id=CELEBA_DRIVE_ID, output=tmp, quiet=False)
    except KeyboardInterrupt:
        fail("interrupted")
    except Exception as e:  # gdown raises several types; the text says which case it is
        text = str(e)
        if "too many users" in text.lower() or "quota" in text.lower():
            fail("Google Drive's download quota for the file is exhausted ('too many users'); "
                 "try again in a day")
        if any(s in type(e).__name__ + text for s in ("Connection", "Resolve", "resolve", "Timeout", "Max retries")):
            fail("no network connection to Google Drive")
        fail(f"{type(e).__name__}: {text.splitlines()[0] if text else 'no details'}")
    if not os.path.isfile(tmp):
        fail("gdown returned no file")
    if not zipfile.is_zipfile(tmp):
        with open(tmp, "rb") as f:
            head = f.read(512).lower()
        kind = "an HTML page (Drive's quota or permission page)" if b"<html" in head or b"<!doctype" in head else "not a zip file"
        fail(f"Google Drive sent {kind} instead of the zip")
    digest = file_digest(tmp, "md5")
    if CELEBA_MD5 and digest != CELEBA_MD5:
        fail(f"the downloaded zip has MD5 {digest}, expected {CELEBA_MD5}")
    os.replace(tmp, final)
    return final


# ----------------------------------------------------------------------------- split and batches

def load_images(dataset, data_path, max_images=None, num_workers=0, verbose=True):
    """The whole dataset as uint8 (N, 3, 64, 64), `max_images` limiting N before the split."""
    if dataset == "synthetic":
        return synthetic_faces(max_images or SYNTHETIC_DEFAULT_COUNT, seed=0)
    if dataset == "folder":
        return load_folder(data_path, max_images, num_workers, verbose)
    if dataset == "celeba":
        return load_folder(find_celeba(data_path), max_images, num_workers, verbose)
    raise UserError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")


def split_images(images, test_fraction=0.2):
    """Deterministic train/test split (default 4:1) by a fixed permutation: (train, test)."""
    if not 0 < test_fraction < 1:
        raise UserError(f"--test_fraction must be in (0, 1), got {test_fraction}")
    n = len(images)
    n_test = int(round(n * test_fraction))
    if n_test < 1 or n - n_test < 1:
        raise UserError(f"{n} images cannot be split into train and test with --test_fraction {test_fraction}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    return images[order[n_test:]], images[order[:n_test]]


def to_float(batch):
    """uint8 [0, 255] -> float32 [-1, 1] (the decoder's Tanh range)."""
    return batch.float().div_(127.5).sub_(1.0)


def fits_on_device(images, device, share=0.5):
    """Whether `images` take less than `share` of the free memory of a CUDA device."""
    if device.type != "cuda":
        return device.type == "cpu"
    free, _ = torch.cuda.mem_get_info(device)
    return images.numel() * images.element_size() < share * free


class TensorLoader:
    """Batches sliced from an in-memory uint8 image tensor, returned as float in [-1, 1] on `device`.

    With `shuffle`, each epoch has its own permutation from a generator seeded by (seed, epoch), so
    a resumed run sees the same batches as an uninterrupted one. `batches(start=k)` skips the first
    k batches of the epoch (mid-epoch resume).

    `resident`: keep the whole uint8 tensor on `device` and slice it there (default: on CUDA when it
    fits in half the free memory). Otherwise, on CUDA, the tensor is pinned and each batch is
    gathered into one of two pinned buffers and copied without blocking. The permutation is drawn
    on the CPU either way, so both give the same batches. `channels_last` sets the batch layout.
    """

    def __init__(self, images, batch_size, device="cpu", shuffle=False, seed=0, resident=None,
                 channels_last=False):
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.channels_last = channels_last
        self.resident = fits_on_device(images, self.device) if resident is None else resident
        if self.resident:
            self.images = images.to(self.device)
        elif self.device.type == "cuda":
            self.images = images.pin_memory()
        else:
            self.images = images
        self._buffers = None  # pinned staging buffers and their copy-done events (CUDA, host data)

    def __len__(self):
        return math.ceil(len(self.images) / self.batch_size)

    @property
    def num_images(self):
        return len(self.images)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def ordered(self):
        """The same images in a fixed order (for evaluation and BatchNorm re-estimation)."""
        return TensorLoader(self.images, self.batch_size, self.device, resident=self.resident,
                            channels_last=self.channels_last)

    def _staged(self, i, idx):
        """Gather host rows `idx` into pinned buffer i % 2 and start its copy to the device."""
        if self._buffers is None:
            shape = (self.batch_size, *self.images.shape[1:])
            self._buffers = [(torch.empty(shape, dtype=self.images.dtype).pin_memory(), torch.cuda.Event())
                             for _ in range(2)]
        buf, done = self._buffers[i % 2]
        done.synchronize()  # the copy that last used this buffer has finished
        torch.index_select(self.images, 0, idx, out=buf[:len(idx)])
        batch = buf[:len(idx)].to(self.device, non_blocking=True)
        done.record()
        return batch

    def batches(self, start=0):
        order = None
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(len(self.images), generator=gen)
        for i in range(start, len(self)):
            lo, hi = i * self.batch_size, (i + 1) * self.batch_size
            if order is None:  # a contiguous slice: already pinned or resident
                batch = self.images[lo:hi].to(self.device, non_blocking=True)
            elif self.resident:
                batch = self.images[order[lo:hi].to(self.device)]
            elif self.device.type == "cuda":
                batch = self._staged(i, order[lo:hi])
            else:
                batch = self.images[order[lo:hi]].to(self.device)
            batch = to_float(batch)
            yield batch.contiguous(memory_format=torch.channels_last) if self.channels_last else batch

    def __iter__(self):
        return self.batches()


DATA_DEFAULTS = dict(dataset="celeba", data_path="data", max_images=None, test_fraction=0.2,
                     batch_size=64, num_workers=4)


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


def build_loaders(args, device):
    """(train_loader, test_loader) for the run's data flags; train is shuffled by --seed.

    On CUDA the images stay in GPU memory when they fit, unless --no_gpu_data."""
    images = load_images(args.dataset, args.data_path, args.max_images, args.num_workers)
    train, test = split_images(images, args.test_fraction)
    options = dict(resident=False if getattr(args, "no_gpu_data", False) else None,
                   channels_last=getattr(args, "channels_last", False))
    return (TensorLoader(train, args.batch_size, device, shuffle=True, seed=getattr(args, "seed", 0), **options),
            TensorLoader(test, args.batch_size, device, **options))


def get_args_parser():
    p = ArgParser("dataset.py", description="Decode (and cache) a dataset and save a grid of its images.")
    p.add_argument("--dataset", choices=DATASETS, default="celeba")
    p.add_argument("--data_path", default="data")
    p.add_argument("--max_images", type=int, default=None)
    p.add_argument("--num_workers", type=int, default=4)
    p.add_argument("--grid", default="samples.png", help="PNG to write (default: samples.png)")
    p.add_argument("--nrow", type=int, default=8, help="images per row of the grid")
    return p


def main(args):
    import torchvision.utils as vutils
    images = load_images(args.dataset, args.data_path, args.max_images, args.num_workers)
    vutils.save_image(images[:args.nrow * args.nrow].float() / 255, args.grid, nrow=args.nrow)
    print(f"{len(images)} images of {tuple(images.shape[1:])}; grid of the first "
          f"{min(len(images), args.nrow ** 2)} written to {args.grid}")


if __name__ == "__main__":
    run_cli(main, get_args_parser())
