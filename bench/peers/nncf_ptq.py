"""NNCF post-training INT8 quantization of the fp32 OpenVINO model (`nncf.quantize`), run in OpenVINO."""

from __future__ import annotations

from pathlib import Path

from hpqdeploy.lower.export import to_numpy

from . import PEERS, Peer
from .case import Case


@PEERS.register("nncf-ptq")
class NncfPtq(Peer):
    runtimes = ("openvino",)
    models = ("resnet20", "minilm")
    summary = ("nncf.quantize (INT8, default preset, ModelType.TRANSFORMER for MiniLM) of the fp32 IR, calibrated on"
               " the same 256 examples; saved with ov.save_model defaults")

    def build(self, case: Case, runtime: str, out: Path) -> list[str]:
        import nncf
        import openvino as ov

        model = ov.Core().read_model(str(case.fp32_export("openvino") / "model.xml"))
        dataset = nncf.Dataset([to_numpy(inputs) for inputs, _ in case.calib])  # 8 batches of 32
        extra = {"model_type": nncf.ModelType.TRANSFORMER} if case.modality == "text" else {}
        quantized = nncf.quantize(model, dataset, subset_size=len(case.calib), **extra)
        ov.save_model(quantized, str(out / "model.xml"))
        return [f"nncf {nncf.__version__}: nncf.quantize defaults (overflow fix on the first layer only)"
                + (", model_type TRANSFORMER" if extra else "")]
