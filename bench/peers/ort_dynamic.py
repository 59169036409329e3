"""ONNX Runtime's `quantize_dynamic` (int8 weights, activations quantized per batch at run time) of the fp32 ONNX
model: the recipe ONNX Runtime's documentation recommends for transformers."""

from __future__ import annotations

from pathlib import Path

from . import PEERS, Peer
from .case import Case


@PEERS.register("ort-dynamic")
class OrtDynamic(Peer):
    runtimes = ("onnxruntime",)
    models = ("minilm",)
    summary = ("onnxruntime.quantization.quantize_dynamic: QInt8 weights (its default), per-tensor, MatMul/Gemm/"
               "Attention and the other ops it quantizes by default, after quant_pre_process")

    def build(self, case: Case, runtime: str, out: Path) -> list[str]:
        import onnxruntime
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.quantization.shape_inference import quant_pre_process

        pre = out / "preprocessed.onnx"
        quant_pre_process(str(case.fp32_export("onnxruntime") / "model.onnx"), str(pre))
        quantize_dynamic(str(pre), str(out / "model.onnx"), weight_type=QuantType.QInt8)
        pre.unlink()
        return [f"onnxruntime {onnxruntime.__version__}: quantize_dynamic, QInt8 weights"]
