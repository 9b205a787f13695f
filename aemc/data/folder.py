"""Any folder of images as one uint8 tensor (N, 3, 64, 64), decoded once and cached inside the folder.

The cache (`<folder>/.cache-64px-all.pt`, or `-first<N>.pt` with --max_images N) records the file
list's signature, the preprocessing and the cache version; when any differs from the folder now, it
is rebuilt in place, so a folder holds at most one cache per --max_images setting.
"""
import hashlib
import os
import re

import torch
from tqdm import tqdm

from aemc.errors import UserError, warn
from aemc.files import atomic_write, remove_stale_temporaries

IMAGE_SIZE = 64
CACHE_VERSION = 2


def preprocess(size=IMAGE_SIZE, channels=3):
    """What decoding does, as the cache records it (a cache made otherwise is rebuilt)."""
    mode = "RGB" if channels == 3 else "L"
    return f"PIL {mode}; resize shorter side to {size} (bilinear, antialiased); center crop {size}"



_LEGACY_CACHE = re.compile(rf"^\.cache-{IMAGE_SIZE}px-\d+\.pt$")  # version 1 named caches by image count


def image_extensions():
    """torchvision's image extensions (imported here: torchvision takes seconds to import)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS
    return IMG_EXTENSIONS


def list_images(root):
    """Image files under `root` (torchvision's image extensions, recursively, hidden entries
    skipped), sorted, as paths relative to `root`."""
    extensions = image_extensions()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(extensions):
                found.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(found)


def has_images(path):
    """Whether `path` is a folder with at least one image file somewhere below it."""
    extensions = image_extensions()
    return os.path.isdir(path) and any(name.lower().endswith(extensions)
                                       for _, _, names in os.walk(path) for name in names)


def decode_image(path, size=IMAGE_SIZE, channels=3):
    """One image file -> uint8 (channels, size, size): RGB (or grey with channels=1), shorter side
    resized to `size`, centre crop."""
    import torchvision.transforms.functional as TF
    from PIL import Image
    with Image.open(path) as im:
        im = im.convert("RGB" if channels == 3 else "L")  # grey, palette and RGBA (alpha dropped) all convert
        return TF.pil_to_tensor(TF.center_crop(TF.resize(im, size), size))


class _DecodeFiles(torch.utils.data.Dataset):
    def __init__(self, root, files, size, channels):
        self.root, self.files, self.size, self.channels = root, files, size, channels

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            return decode_image(os.path.join(self.root, self.files[i]), self.size, self.channels), True
        except Exception:  # unreadable or truncated file: skipped and counted by the caller
            return torch.zeros(self.channels, self.size, self.size, dtype=torch.uint8), False


def _source_signature(root, files):
    """Fingerprint of the files a cache was built from: names, sizes and modification times."""
    h = hashlib.sha256()
    for rel in files:
        st = os.stat(os.path.join(root, rel))
        h.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cache_path(root, max_images=None, size=IMAGE_SIZE, channels=3):
    grey = "" if channels == 3 else "grey-"
    return os.path.join(root, f".cache-{size}px-{grey}{'all' if max_images is None else f'first{max_images}'}.pt")


def load_folder(root, max_images=None, num_workers=0, verbose=True, size=IMAGE_SIZE, channels=3):
    """All images under `root` (the first `max_images` files) as uint8 (N, channels, size, size), via
    the cache."""
    if not os.path.isdir(root):
        raise UserError(f"image folder {root} does not exist; check --data_path")
    files = list_images(root)
    if not files:
        raise UserError(f"no images ({', '.join(image_extensions())}) found under {root}; check --data_path")
    if max_images is not None:
        files = files[:max_images]
    meta = dict(version=CACHE_VERSION, preprocess=preprocess(size, channels), count=len(files),
                signature=_source_signature(root, files))
    cache = cache_path(root, max_images, size, channels)
    if os.path.exists(cache):
        try:
            saved = torch.load(cache, map_location="cpu", weights_only=True, mmap=True)
            if saved.get("meta") == meta:
                return saved["images"]
            changed = [k for k in meta if saved.get("meta", {}).get(k) != meta[k]]
            reason = f"{', '.join(changed)} changed"
        except Exception:
            reason = "unreadable"
        warn(f"image cache {cache} is stale ({reason}); rebuilding")

    images = torch.empty(len(files), channels, size, size, dtype=torch.uint8)
    ok = torch.empty(len(files), dtype=torch.bool)
    loader = torch.utils.data.DataLoader(_DecodeFiles(root, files, size, channels), batch_size=256,
                                         num_workers=num_workers)
    pos = 0
    for batch, good in tqdm(loader, desc=f"decoding {len(files)} images", unit="batch", disable=not verbose):
        images[pos:pos + len(batch)], ok[pos:pos + len(batch)] = batch, good
        pos += len(batch)
    if not ok.all():
        bad = [f for f, g in zip(files, ok.tolist()) if not g]
        warn(f"warning: skipped {len(bad)} unreadable image file(s) under {root} (first: {bad[0]})")
        images = images[ok]
    if len(images) == 0:
        raise UserError(f"none of the {len(files)} image files under {root} could be read")
    _write_cache(root, cache, meta, images)
    return images


def _write_cache(root, cache, meta, images):
    """Write the cache atomically, and remove what it supersedes: caches of the earlier naming
    and temporaries of killed writes. A read-only folder just goes without a cache."""
    try:
        with atomic_write(cache) as f:
            torch.save({"meta": meta, "images": images}, f)
    except OSError as e:
        warn(f"warning: cannot write image cache {cache} ({e.strerror}); images will be decoded again next run")
        return
    remove_stale_temporaries(root, prefix=".cache-")
    for name in os.listdir(root):
        if _LEGACY_CACHE.match(name):
            os.remove(os.path.join(root, name))
