"""CIFAR-10 from `train.tar.xz`/`test.tar.xz` archives, an ImageFolder tree, or the Hugging Face hub.

Archives are read in place (no extraction) and their decoded pixels cached as `.npz`, keyed by the archive's
path, size and modification time.
"""

from __future__ import annotations

import hashlib
import io
import lzma
import tarfile
import warnings
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from hpqdeploy import atomic
from hpqdeploy.data.base import DataRequest, DatasetInfo, Splits, register_dataset
from hpqdeploy.data.images import image_splits
from hpqdeploy.errors import UserError

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
DEFAULT_CACHE_DIR = Path("~/.cache/hpqdeploy")
INFO = DatasetInfo(
    name="cifar10",
    modality="image",
    num_classes=len(CLASSES),
    input_shape=(3, 32, 32),
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
)
FIX = "pass --data-dir with train.tar.xz/test.tar.xz or an ImageFolder tree (train/<class>/, test/<class>/)"

Arrays = tuple[np.ndarray, np.ndarray]  # (N, 3, 32, 32) uint8 images, (N,) int64 labels


@register_dataset("cifar10")
def load_cifar10(request: DataRequest) -> Splits:
    if request.data_dir is None:
        train, test, source = _from_hub()
    else:
        train, test, source = _from_dir(Path(request.data_dir), request.cache_dir)
    return image_splits(INFO, train, test, request, source, augment=True)


def _from_dir(data_dir: Path, cache_dir: Path | None) -> tuple[Arrays, Arrays, str]:
    if not data_dir.is_dir():
        raise UserError(f"CIFAR-10 directory {data_dir} does not exist; {FIX}")
    archives = [data_dir / "train.tar.xz", data_dir / "test.tar.xz"]
    if any(a.exists() for a in archives):
        for archive in archives:
            if not archive.is_file():
                raise UserError(f"{archive} is missing; {FIX}")
        cache = (cache_dir or DEFAULT_CACHE_DIR).expanduser()
        return _cached(archives[0], "train", cache), _cached(archives[1], "test", cache), str(data_dir)
    for root in (data_dir, data_dir / "cifar10_jpg"):
        if (root / "train").is_dir() and (root / "test").is_dir():
            return _read_folder(root / "train"), _read_folder(root / "test"), str(root)
    raise UserError(f"{data_dir} holds neither train.tar.xz/test.tar.xz nor train/ and test/ folders; {FIX}")


def _labelled(found: dict[str, list], where: Path) -> Arrays:
    """Stack decoded images found per class folder; the folder names must be CIFAR-10's ten classes."""
    if set(found) != set(CLASSES):
        found_names = ", ".join(sorted(found)) or "none"
        raise UserError(f"{where}: expected class folders {', '.join(CLASSES)}, found {found_names}")
    images = [image for name in CLASSES for image in found[name]]
    labels = [label for label, name in enumerate(CLASSES) for _ in found[name]]
    return np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2)), np.asarray(labels, dtype=np.int64)


def _decode(data: bytes | Path, what: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
            pixels = np.asarray(image.convert("RGB"))
    except OSError as err:  # PIL's UnidentifiedImageError included
        raise UserError(f"cannot decode image {what}: {err}; replace the file or the archive") from err
    if pixels.shape != (32, 32, 3):
        raise UserError(f"image {what} is {pixels.shape[1]}x{pixels.shape[0]}, CIFAR-10 images are 32x32")
    return pixels


def _read_folder(split_dir: Path) -> Arrays:
    found = {}
    for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        files = sorted(f for f in class_dir.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            found[class_dir.name] = [_decode(f, str(f)) for f in files]
    return _labelled(found, split_dir)


def _read_archive(archive: Path, split: str) -> Arrays:
    """Decode `<anything>/<split>/<class>/<file>.jpg` members of a tar archive in name order."""
    members: dict[str, list[tuple[str, bytes]]] = {}
    try:
        with tarfile.open(archive) as tar:
            for member in tar:
                path = PurePosixPath(member.name)
                if member.isfile() and path.suffix.lower() in IMAGE_SUFFIXES and path.parts[-3:-2] == (split,):
                    members.setdefault(path.parts[-2], []).append((member.name, tar.extractfile(member).read()))
    except (tarfile.TarError, lzma.LZMAError, EOFError, OSError) as err:
        raise UserError(f"cannot read archive {archive}: {err}; download it again") from err
    found = {
        cls: [_decode(data, f"{archive}:{name}") for name, data in sorted(files)] for cls, files in members.items()
    }
    return _labelled(found, archive / split)


def _cached(archive: Path, split: str, cache_dir: Path) -> Arrays:
    stat = archive.stat()
    key = hashlib.sha256(f"{archive.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cache_file = cache_dir / f"cifar10-{split}-{key}.npz"
    if cache_file.is_file():
        try:
            with np.load(cache_file) as cached:
                return cached["images"], cached["labels"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass  # unreadable cache: decode the archive again and overwrite it
    images, labels = _read_archive(archive, split)
    try:
        _save_atomically(cache_file, images=images, labels=labels)
    except OSError as err:
        warnings.warn(f"could not cache decoded CIFAR-10 in {cache_dir} ({err}); pass a writable cache_dir")
    return images, labels


def _save_atomically(path: Path, **arrays: np.ndarray) -> None:
    """Write to a temporary file next to `path`, then rename: readers never see a half-written cache."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic.write_file(path, write)


def _from_hub() -> tuple[Arrays, Arrays, str]:
    try:
        import datasets

        hub = datasets.load_dataset("cifar10")
    except Exception as err:  # not installed, offline, or the hub refused: all fixed the same way
        raise UserError(
            f"cannot load cifar10 from the Hugging Face hub ({type(err).__name__}); "
            f"pip install 'hpqdeploy[hub]' and go online, or {FIX}"
        ) from err

    def arrays(split) -> Arrays:
        images = np.stack([np.asarray(image.convert("RGB")) for image in split["img"]])
        return images.transpose(0, 3, 1, 2), np.asarray(split["label"], dtype=np.int64)

    return arrays(hub["train"]), arrays(hub["test"]), "the Hugging Face hub"
