"""ONNX Runtime's `quantize_static` (QDQ, per-channel int8 weights, uint8 activations) of the fp32 ONNX model."""

from __future__ import annotations

from pathlib import Path

from hpqdeploy.lower.export import to_numpy

from . import PEERS, Peer
from .case import Case


@PEERS.register("ort-static")
class OrtStatic(Peer):
    runtimes = ("onnxruntime",)
    models = ("resnet20", "minilm")
    summary = ("onnxruntime.quantization.quantize_static: QDQ, per-channel QInt8 weights, QUInt8 activations (its "
               "defaults but per_channel), MinMax calibration on the same 256 examples, after quant_pre_process")

    def build(self, case: Case, runtime: str, out: Path) -> list[str]:
        import onnxruntime
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        feeds = []
        for inputs, _ in case.calib:
            arrays = to_numpy(inputs)
            feeds.append(arrays if isinstance(arrays, dict) else {"input": arrays})

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter(feeds)

            def get_next(self):
                return next(self.it, None)

        pre = out / "preprocessed.onnx"
        quant_pre_process(str(case.fp32_export("onnxruntime") / "model.onnx"), str(pre))
        quantize_static(str(pre), str(out / "model.onnx"), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        pre.unlink()
        return [f"onnxruntime {onnxruntime.__version__}: quantize_static QDQ, per-channel"]
