"""What every pipeline of one model shares: the fine-tuned baseline, its data splits and the fine-tuning budget.

All of it is read from the `hpqdeploy compress` runs the peer benchmark compares against, so a peer calibrates on
the same 8 x 32 calibration examples, fine-tunes with the same epochs, optimizer and distillation, and is evaluated
on the same split as the hpqdeploy rows.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from hpqdeploy import artifact
from hpqdeploy.config import TrainConfig
from hpqdeploy.config import DataOptions
from hpqdeploy.lower.export import fixed_collate
from hpqdeploy.pipeline import load_data
from hpqdeploy.training.loop import loader

CALIB_BATCHES, BATCH = 8, 32  # as `hpqdeploy export` calibrates
BATCHES = (1, BATCH)  # the batch sizes every artifact must run (ExecuTorch: one program each)


@dataclass
class Case:
    name: str  # "resnet20" | "minilm"
    runs: Path  # holds NAME/{baseline,hybrid,prune,quant} from compress_bench.py and export/NAME/... from export()

    @property
    def baseline_dir(self) -> Path:
        return self.runs / self.name / "baseline"

    @cached_property
    def baseline(self):
        return artifact.load(self.baseline_dir).model  # LoadedModel; .module is the fp32 fine-tuned baseline

    @property
    def modality(self) -> str:
        return self.baseline.modality

    @cached_property
    def compress_config(self) -> dict:
        """The methods' own configuration (compress_bench gives them one): the fine-tuning budget and data every
        peer must match."""
        for method in ("hybrid", "prune", "quant"):
            prov = self.runs / self.name / method / "provenance.json"
            if prov.exists():
                return json.loads(prov.read_text())["config"]
        raise FileNotFoundError(f"no compress run under {self.runs / self.name}: run bench/compress_bench.py first")

    @cached_property
    def train_config(self) -> TrainConfig:
        return TrainConfig(**self.compress_config["train"])

    @cached_property
    def splits(self):
        data = DataOptions(**self.compress_config["data"])
        return load_data(data.name, data.request(self.train_config.seed))

    @cached_property
    def eval_splits(self):
        """The evaluation split as `hpqdeploy export` reads it (the baseline's data options, no train limit)."""
        data = DataOptions(**artifact.load(self.baseline_dir).plan["data"])
        return load_data(data.name, data.request(0))

    @property
    def collate(self):
        return fixed_collate(self.baseline)

    @cached_property
    def calib(self) -> list:
        return list(loader(self.eval_splits.calib, self.collate, BATCH, shuffle=False))[:CALIB_BATCHES]

    @cached_property
    def example(self):
        return next(iter(loader(self.eval_splits.eval, self.collate, 1, shuffle=False)))[0]

    def eval_loader(self):
        return loader(self.eval_splits.eval, self.collate, BATCH, shuffle=False)

    def train_loader(self):
        cfg = self.train_config
        return loader(self.splits.train, self.baseline.collate, cfg.batch_size, shuffle=True, seed=cfg.seed)

    def fresh_baseline(self) -> torch.nn.Module:
        return copy.deepcopy(self.baseline.module).eval()

    def fp32_export(self, runtime: str) -> Path:
        """The baseline as `hpqdeploy export` lowered it to RUNTIME (fp32): where the PTQ peers start, as their
        users start from their own fp32 ONNX or OpenVINO model."""
        return self.runs / "export" / self.name / f"baseline-{runtime}"
