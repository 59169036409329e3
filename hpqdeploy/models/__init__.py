"""Model registry: a name (`resnet20`, `mobilenet_v2`, `minilm`, ...), a Hugging Face directory, or
`module:function`."""

from hpqdeploy.models.registry import load_model, model_names, rebuild_model
from hpqdeploy.models.spec import LoadedModel, ModelSpec

__all__ = ["LoadedModel", "ModelSpec", "load_model", "model_names", "rebuild_model"]
