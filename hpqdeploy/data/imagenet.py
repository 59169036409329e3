"""ImageNet (or any ImageNet-style classification set) from `train/<class>/` and `val/<class>/` folders.

Images stay on disk and are decoded per item; the folder trees are scanned once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
from torch.utils.data import Dataset

from hpqdeploy.data.base import DataRequest, DatasetInfo, Splits, register_dataset
from hpqdeploy.data.images import split_indices
from hpqdeploy.errors import UserError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FIX = "pass --data-dir with ImageFolder trees train/<class>/*.JPEG and val/<class>/*.JPEG"


class FolderSubset(Dataset):
    """Items `indices` of a scanned image folder, each decoded and transformed when read."""

    def __init__(self, folder: Any, indices: np.ndarray, transform: Callable):
        self.folder, self.indices, self.transform = folder, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.folder.samples[self.indices[index]]
        return self.transform(self.folder.loader(path)), label


@register_dataset("imagenet")
def load_imagenet(request: DataRequest) -> Splits:
    if request.data_dir is None:
        raise UserError(f"imagenet cannot be downloaded; {FIX}")
    data_dir = Path(request.data_dir)
    train_folder, val_folder = (_scan(data_dir / split) for split in ("train", "val"))
    if train_folder.classes != val_folder.classes:
        raise UserError(f"{data_dir / 'train'} and {data_dir / 'val'} have different class folders; {FIX}")

    augment, center = _transforms()
    train_idx, calib_idx, eval_idx = split_indices(
        np.asarray(train_folder.targets), np.asarray(val_folder.targets), request, str(data_dir)
    )
    info = DatasetInfo(
        name="imagenet",
        modality="image",
        num_classes=len(train_folder.classes),
        input_shape=(3, 224, 224),
        mean=MEAN,
        std=STD,
        eval_split_name="val",
    )
    return Splits(
        info=info,
        train=FolderSubset(train_folder, train_idx, augment),
        calib=FolderSubset(train_folder, calib_idx, center),
        eval=FolderSubset(val_folder, eval_idx, center),
    )


def _scan(split_dir: Path) -> Any:
    from torchvision.datasets import ImageFolder  # imported here, like below: torchvision is slow to import

    if not split_dir.is_dir():
        raise UserError(f"{split_dir} does not exist; {FIX}")
    try:
        return ImageFolder(split_dir)
    except FileNotFoundError as err:  # no class folders, or a class folder without images
        raise UserError(f"{split_dir}: {err}; {FIX}") from err


def _transforms() -> tuple[Callable, Callable]:
    """The usual ImageNet recipe: random resized crops and flips for training, a 224 centre crop otherwise."""
    from torchvision import transforms

    normalize = [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    augment = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), *normalize])
    center = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), *normalize])
    return augment, center
