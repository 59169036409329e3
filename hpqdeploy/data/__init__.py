"""Data sets by name: `load_data("cifar10", DataRequest(data_dir=...))` returns train, calibration and eval splits."""

from hpqdeploy.data import cifar10, digits, fashion_mnist, glue, imagenet  # noqa: F401  (they register themselves)
from hpqdeploy.data.base import DataRequest, DatasetInfo, Splits, dataset_names, load_data, register_dataset

__all__ = ["DataRequest", "DatasetInfo", "Splits", "dataset_names", "load_data", "register_dataset"]
