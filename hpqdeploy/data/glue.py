"""GLUE SST-2 and QQP from the task's `train.tsv`/`dev.tsv`, or from the Hugging Face hub.

The dev set is the evaluation split (GLUE's test labels are not public). Items are `(sentence, label)` for SST-2
and `((question1, question2), label)` for QQP.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from torch.utils.data import Dataset

from hpqdeploy.data.base import DataRequest, DatasetInfo, Splits, register_dataset
from hpqdeploy.data.images import split_indices
from hpqdeploy.errors import UserError

Item = tuple[Any, int]


@dataclass(frozen=True)
class GlueTask:
    info: DatasetInfo
    header: tuple[str, ...]  # columns of the tsv files
    item: Callable[[dict[str, str]], Item]  # a tsv row by column name -> item
    hub_item: Callable[[dict[str, Any]], Item]  # a hub row -> item


SST2 = GlueTask(
    info=DatasetInfo(name="sst2", modality="text", num_classes=2, eval_split_name="dev"),
    header=("sentence", "label"),
    item=lambda row: (row["sentence"], int(row["label"])),
    hub_item=lambda row: (row["sentence"], int(row["label"])),
)
QQP = GlueTask(
    info=DatasetInfo(name="qqp", modality="text", num_classes=2, text_pair=True, eval_split_name="dev"),
    header=("id", "qid1", "qid2", "question1", "question2", "is_duplicate"),
    item=lambda row: ((row["question1"], row["question2"]), int(row["is_duplicate"])),
    hub_item=lambda row: ((row["question1"], row["question2"]), int(row["label"])),
)


class TextDataset(Dataset):
    def __init__(self, items: list[Item]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Item:
        return self.items[index]


@register_dataset("sst2")
def load_sst2(request: DataRequest) -> Splits:
    return _load(SST2, request)


@register_dataset("qqp")
def load_qqp(request: DataRequest) -> Splits:
    return _load(QQP, request)


def _load(task: GlueTask, request: DataRequest) -> Splits:
    if request.data_dir is None:
        train, dev, source = _from_hub(task)
    else:
        train, dev, source = _from_dir(Path(request.data_dir), task)
    labels = [np.asarray([label for _, label in items]) for items in (train, dev)]
    train_idx, calib_idx, eval_idx = split_indices(*labels, request, source)
    return Splits(
        info=task.info,
        train=TextDataset([train[i] for i in train_idx]),
        calib=TextDataset([train[i] for i in calib_idx]),
        eval=TextDataset([dev[i] for i in eval_idx]),
    )


def _fix(task: GlueTask) -> str:
    return f"pass --data-dir with GLUE's train.tsv and dev.tsv (header: {' '.join(task.header)})"


def _from_dir(data_dir: Path, task: GlueTask) -> tuple[list[Item], list[Item], str]:
    if not data_dir.is_dir():
        raise UserError(f"{task.info.name} directory {data_dir} does not exist; {_fix(task)}")
    return _read_tsv(data_dir / "train.tsv", task), _read_tsv(data_dir / "dev.tsv", task), str(data_dir)


def _read_tsv(path: Path, task: GlueTask) -> list[Item]:
    """Rows with the wrong number of columns or a label outside 0..num_classes-1 are skipped with a warning."""
    if not path.is_file():
        raise UserError(f"{path} is missing; {_fix(task)}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text ({err}); {_fix(task)}") from err
    if not lines or tuple(lines[0].split("\t")) != task.header:
        found = lines[0][:80] if lines else "an empty file"
        raise UserError(f"{path}: expected the header {' '.join(task.header)!r}, found {found!r}; {_fix(task)}")
    items, skipped = [], 0
    for line in filter(str.strip, lines[1:]):
        item = _parse_row(line.split("\t"), task)
        if item is None:
            skipped += 1
        else:
            items.append(item)
    if skipped:
        warnings.warn(f"{path}: skipped {skipped} malformed rows")
    return items


def _parse_row(fields: list[str], task: GlueTask) -> Item | None:
    if len(fields) != len(task.header):
        return None
    try:
        item = task.item(dict(zip(task.header, fields)))
    except ValueError:
        return None
    return item if 0 <= item[1] < task.info.num_classes else None


def _from_hub(task: GlueTask) -> tuple[list[Item], list[Item], str]:
    try:
        import datasets

        hub = datasets.load_dataset("glue", task.info.name)
    except Exception as err:  # not installed, offline, or the hub refused: all fixed the same way
        raise UserError(
            f"cannot load GLUE {task.info.name} from the Hugging Face hub ({type(err).__name__}); "
            f"pip install 'hpqdeploy[hub]' and go online, or {_fix(task)}"
        ) from err
    train, dev = ([task.hub_item(row) for row in hub[split]] for split in ("train", "validation"))
    return train, dev, "the Hugging Face hub"
