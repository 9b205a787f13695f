"""Procedurally drawn synthetic faces: a built-in dataset that needs no files or network, used by
the demo and the tests. Deterministic: the same seed gives the same faces on any machine, and the
first N faces do not depend on how many are drawn.

Drawing takes about a second per 256 faces on two CPU cores, so `synthetic_faces` keeps what it
drew: in the process's memory, and on disk in the user's cache folder (`AEMC_CACHE_DIR`, else
`$XDG_CACHE_HOME/aemc`, else `~/.cache/aemc`), like the decoded cache of an image folder.
"""
import os
import pickle

import torch

from aemc.files import atomic_write

IMAGE_SIZE = 64
DEFAULT_COUNT = 10_000
VERSION = 1  # of the drawing: bump it when the faces change, and older caches are not read
_MEMORY = {}  # (count, seed, size) -> faces drawn by this process


def cache_dir():
    return os.environ.get("AEMC_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "aemc")


def synthetic_faces(count=DEFAULT_COUNT, seed=0, size=IMAGE_SIZE):
    """The faces `draw_faces` draws, uint8 (count, 3, size, size), from this process's memory or the
    disk cache when they were drawn before (a fresh copy each call: callers may change it)."""
    key = (count, seed, size)
    for (n, s, z), faces in _MEMORY.items():  # the first N faces do not depend on how many were drawn
        if (s, z) == (seed, size) and n >= count:
            return faces[:count].clone()
    path = os.path.join(cache_dir(), f"synthetic-v{VERSION}-{size}px-seed{seed}-{count}.pt")
    faces = _read(path, key)
    if faces is None:
        faces = draw_faces(count, seed, size)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with atomic_write(path) as f:
                torch.save({"version": VERSION, "key": list(key), "faces": faces}, f)
        except OSError:  # a read-only home: the faces are drawn again next time
            pass
    if len(_MEMORY) >= 4:
        _MEMORY.pop(next(iter(_MEMORY)))
    _MEMORY[key] = faces
    return faces.clone()


def _read(path, key):
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError):
        return None
    if not isinstance(saved, dict) or saved.get("version") != VERSION or saved.get("key") != list(key):
        return None
    return saved["faces"]


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


def draw_faces(count=DEFAULT_COUNT, seed=0, size=IMAGE_SIZE, chunk=256):
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
