"""Aligned CelebA: found in the layouts users have (extracted, torchvision's, Kaggle's, the zip),
or downloaded from Google Drive with gdown, checked, and extracted. Returns the image folder;
decoding and caching are image_folder's job."""
import os
import shutil
import zipfile

from tqdm import tqdm

from aemc.data.folder import has_images
from aemc.errors import UserError, warn
from aemc.files import file_digest

# Aligned CelebA as torchvision downloads it (Google Drive file of img_align_celeba.zip).
CELEBA_DRIVE_ID = "0B7EVK8r0v71pZjFTYXZWM3FlRnM"
CELEBA_MD5 = "00d2c5bc6d35e252742224ab0c1e8fcb"
CELEBA_MANUAL = (
    "get aligned CelebA by hand and pass its folder with --data_path: either an extracted "
    "img_align_celeba/ folder (or img_align_celeba.zip) inside it, torchvision's layout "
    "(<data_path>/celeba/img_align_celeba/), or Kaggle's jessicali9530/celeba-dataset unzipped "
    "there; or use --dataset folder / --dataset synthetic")


def find_celeba(data_path, download=True):
    """The folder of aligned CelebA images under `data_path`, extracting or downloading it if needed.

    Looks for, in order: <data_path>/img_align_celeba/ (also Kaggle's nested layout),
    <data_path>/celeba/img_align_celeba/ (torchvision), <data_path> itself when it is that folder,
    then img_align_celeba.zip in either place (extracted next to it); otherwise downloads the zip.
    """
    folders = [os.path.join(data_path, "img_align_celeba"),
               os.path.join(data_path, "celeba", "img_align_celeba")]
    for folder in folders:
        if has_images(folder):
            return folder
    if os.path.basename(os.path.normpath(data_path)) == "img_align_celeba" and has_images(data_path):
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

    warn(f"downloading aligned CelebA (1.4 GB) into {data_path} ...")
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
        html = b"<html" in head or b"<!doctype" in head
        kind = "an HTML page (Drive's quota or permission page)" if html else "not a zip file"
        fail(f"Google Drive sent {kind} instead of the zip")
    digest = file_digest(tmp, "md5")
    if CELEBA_MD5 and digest != CELEBA_MD5:
        fail(f"the downloaded zip has MD5 {digest}, expected {CELEBA_MD5}")
    os.replace(tmp, final)
    return final
