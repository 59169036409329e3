"""hpqdeploy: structured pruning and adaptive quantization of neural networks, lowered into edge runtimes and
measured on the device.

The Python API works on models in memory (see `hpqdeploy.api`): `plan`, `apply`, `finetune`, `evaluate`, `save`,
`load`, `export`, `profile`, with the stages' configurations `CompressOptions`, `TrainConfig`, `DataOptions`,
`ExportOptions` and `ProfileOptions`. Names are imported on first use, so the command line starts fast.
"""

from __future__ import annotations

import importlib

__all__ = ["CompressOptions", "DataOptions", "ExportOptions", "ProfileOptions", "TrainConfig", "Artifact",
           "LoadedModel", "ModelSpec", "apply", "evaluate", "export", "finetune", "load", "load_data", "load_model",
           "plan", "profile", "save"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("hpqdeploy.api"), name)
    raise AttributeError(f"module 'hpqdeploy' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
