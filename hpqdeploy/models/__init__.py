"""Model registry: a name (`resnet20`, `mobilenet_v2`, `minilm`, ...), a Hugging Face directory, or
`module:function`."""

from hpqdeploy.models.registry import LoadedModel, ModelSpec, load_model, model_names, rebuild_model

__all__ = ["LoadedModel", "ModelSpec", "load_model", "model_names", "rebuild_model"]
