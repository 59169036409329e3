"""scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download).

The data set has no official test split, so the evaluation split is a fixed stratified 20% (random_state=0),
independent of `request.seed`: every run is scored on the same images.
"""

from __future__ import annotations

import numpy as np

from hpqdeploy.data.base import DataRequest, DatasetInfo, Splits, register_dataset
from hpqdeploy.data.images import image_splits

PIXEL_MAX = 16.0
EVAL_FRACTION = 0.2
# Mean and std of all 1,797 images scaled to [0, 1] (0.30526, 0.37605), computed once with load_digits().
INFO = DatasetInfo(
    name="digits",
    modality="image",
    num_classes=10,
    input_shape=(1, 8, 8),
    mean=(0.3053,),
    std=(0.3760,),
)


@register_dataset("digits")
def load_digits(request: DataRequest) -> Splits:
    from sklearn.datasets import load_digits as sklearn_digits  # imported here: sklearn is slow to import
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    images = digits.images.astype(np.uint8)[:, None]  # values 0..16
    labels = digits.target.astype(np.int64)
    train_idx, eval_idx = train_test_split(
        np.arange(len(labels)), test_size=EVAL_FRACTION, stratify=labels, random_state=0
    )
    train, evaluation = ((images[idx], labels[idx]) for idx in (train_idx, eval_idx))
    return image_splits(INFO, train, evaluation, request, "scikit-learn's digits", pixel_max=PIXEL_MAX)
