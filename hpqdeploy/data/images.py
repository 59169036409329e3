"""Splitting helpers shared by every loader, and a Dataset over in-memory uint8 images."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from hpqdeploy.data.base import DataRequest, DatasetInfo, Splits
from hpqdeploy.errors import UserError

# The evaluation subset ignores `request.seed`, so runs with different seeds are scored on the same items.
EVAL_SUBSET_SEED = 0
CROP_PADDING = 4


def stratified_subset(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` indices into `labels` keeping the class proportions (largest remainder), in random order.

    The order is random rather than sorted so that any prefix of the subset is itself a fair sample.
    """
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * n / len(labels)
    take = np.floor(quota).astype(int)
    take[np.argsort(take - quota, kind="stable")[: n - take.sum()]] += 1
    picked = [rng.choice(np.flatnonzero(labels == c), k, replace=False) for c, k in zip(classes, take)]
    return rng.permutation(np.concatenate(picked))


def split_indices(
    train_labels: np.ndarray, eval_labels: np.ndarray, request: DataRequest, source: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of the train and calibration items (into `train_labels`) and of the evaluation items.

    Calibration is held out of the training data first, then `train_limit` draws from what is left.
    """
    for name in ("calib_size", "train_limit", "eval_limit"):
        value = getattr(request, name)
        if value is not None and value < 0:
            raise UserError(f"{name} must be >= 0, got {value}")
    if request.calib_size >= len(train_labels):
        raise UserError(
            f"calib_size {request.calib_size} must be smaller than the {len(train_labels)} training items "
            f"of {source}; pass a smaller calibration size"
        )
    rng = np.random.default_rng(request.seed)
    calib = stratified_subset(train_labels, request.calib_size, rng)
    train = np.setdiff1d(np.arange(len(train_labels)), calib)
    if request.train_limit is not None and request.train_limit < len(train):
        train = np.sort(train[stratified_subset(train_labels[train], request.train_limit, rng)])
    evaluation = np.arange(len(eval_labels))
    if request.eval_limit is not None and request.eval_limit < len(eval_labels):
        eval_rng = np.random.default_rng(EVAL_SUBSET_SEED)
        evaluation = np.sort(stratified_subset(eval_labels, request.eval_limit, eval_rng))
    return train, calib, evaluation


def random_crop_flip(image: torch.Tensor) -> torch.Tensor:
    """CIFAR augmentation on a uint8 C x H x W image: zero-pad 4 pixels, crop back at random, flip half the time."""
    height, width = image.shape[-2:]
    padded = F.pad(image, (CROP_PADDING,) * 4)
    top, left = torch.randint(0, 2 * CROP_PADDING + 1, (2,)).tolist()
    image = padded[:, top : top + height, left : left + width]
    return image.flip(-1) if torch.rand(()) < 0.5 else image


class ImageTensorDataset(Dataset):
    """(N, C, H, W) uint8 images and int64 labels; items are normalised float images, optionally augmented."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        info: DatasetInfo,
        augment: bool = False,
        pixel_max: float = 255.0,
    ):
        self.images = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8))
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.augment = augment
        self.pixel_max = pixel_max
        self.mean = torch.tensor(info.mean).view(-1, 1, 1)
        self.std = torch.tensor(info.std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.augment:
            image = random_crop_flip(image)
        return (image.float() / self.pixel_max - self.mean) / self.std, int(self.labels[index])


def image_splits(
    info: DatasetInfo,
    train: tuple[np.ndarray, np.ndarray],
    evaluation: tuple[np.ndarray, np.ndarray],
    request: DataRequest,
    source: str,
    augment: bool = False,
    pixel_max: float = 255.0,
) -> Splits:
    """Splits from (images, labels) arrays of the training and evaluation data; only `train` is augmented."""
    (train_images, train_labels), (eval_images, eval_labels) = train, evaluation
    train_idx, calib_idx, eval_idx = split_indices(train_labels, eval_labels, request, source)

    def subset(images: np.ndarray, labels: np.ndarray, idx: np.ndarray, aug: bool) -> ImageTensorDataset:
        return ImageTensorDataset(images[idx], labels[idx], info, augment=aug, pixel_max=pixel_max)

    return Splits(
        info=info,
        train=subset(train_images, train_labels, train_idx, augment),
        calib=subset(train_images, train_labels, calib_idx, False),
        eval=subset(eval_images, eval_labels, eval_idx, False),
    )
