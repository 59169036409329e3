"""Fashion-MNIST from its idx files (gzipped or not), by default where Debian's `dataset-fashion-mnist` puts them."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from hpqdeploy.data.base import DataRequest, DatasetInfo, Splits, register_dataset
from hpqdeploy.data.images import image_splits
from hpqdeploy.errors import UserError

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
INFO = DatasetInfo(
    name="fashion-mnist",
    modality="image",
    num_classes=10,
    input_shape=(1, 28, 28),
    mean=(0.2860,),
    std=(0.3530,),
)
IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801  # unsigned bytes; 3 and 1 dimensions
FIX = "apt-get install dataset-fashion-mnist, or pass --data-dir with the idx files"


@register_dataset("fashion-mnist")
def load_fashion_mnist(request: DataRequest) -> Splits:
    data_dir = Path(request.data_dir) if request.data_dir is not None else DEFAULT_DIR
    if not data_dir.is_dir():
        raise UserError(f"Fashion-MNIST directory {data_dir} does not exist; {FIX}")
    train, test = (_read_pair(data_dir, prefix) for prefix in ("train", "t10k"))
    return image_splits(INFO, train, test, request, str(data_dir))


def _read_pair(data_dir: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    images_path = _find(data_dir, f"{prefix}-images-idx3-ubyte")
    labels_path = _find(data_dir, f"{prefix}-labels-idx1-ubyte")
    images = _read_idx(images_path, IMAGES_MAGIC)
    labels = _read_idx(labels_path, LABELS_MAGIC).astype(np.int64)
    if images.shape[1:] != (28, 28) or len(images) != len(labels) or labels.max(initial=0) >= INFO.num_classes:
        raise UserError(
            f"{images_path} and {labels_path} do not hold matching 28x28 images and labels 0-9 "
            f"({images.shape}, {labels.shape}); replace them"
        )
    return images[:, None], labels


def _find(data_dir: Path, name: str) -> Path:
    for candidate in (data_dir / f"{name}.gz", data_dir / name):
        if candidate.is_file():
            return candidate
    raise UserError(f"{data_dir / name}(.gz) is missing; {FIX}")


def _read_idx(path: Path, magic: int) -> np.ndarray:
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        raise UserError(f"cannot read {path}: {err}; replace the file") from err
    header_size = 4 * (1 + (magic & 0xFF))  # the magic number, then one 32-bit size per dimension
    if len(raw) < header_size or int.from_bytes(raw[:4], "big") != magic:
        raise UserError(f"{path} is not an idx file of the expected kind (bad magic number); replace the file")
    shape = tuple(int(n) for n in np.frombuffer(raw[4:header_size], dtype=">u4"))
    data = np.frombuffer(raw, dtype=np.uint8, offset=header_size)
    if data.size != np.prod(shape):
        raise UserError(f"{path} holds {data.size} bytes of data, its header promises {np.prod(shape)}; replace it")
    return data.reshape(shape)
