"""NNCF weight compression, INT4 and INT8 mixed by NNCF's own sensitivity metric (`nncf.compress_weights`)."""

from __future__ import annotations

from pathlib import Path

from hpqdeploy.lower.export import to_numpy

from . import PEERS, Peer
from .case import Case

RATIO = 0.5  # share of the linear layers' weights in 4-bit; the rest 8-bit (hpqdeploy's default low-bit budget)


@PEERS.register("nncf-weights")
class NncfWeights(Peer):
    runtimes = ("openvino",)
    models = ("minilm",)
    summary = (f"nncf.compress_weights(mode=INT4_SYM, ratio={RATIO}, group size 128 (its default), dataset: the same "
               "256 examples, so layers are ranked by its data-aware sensitivity metric); the other weights "
               "INT8_ASYM (its backup mode), embeddings and the last layer 8-bit; activations float")

    def build(self, case: Case, runtime: str, out: Path) -> list[str]:
        import nncf
        import openvino as ov

        model = ov.Core().read_model(str(case.fp32_export("openvino") / "model.xml"))
        dataset = nncf.Dataset([to_numpy(inputs) for inputs, _ in case.calib])
        compressed = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT4_SYM, ratio=RATIO, dataset=dataset)
        ov.save_model(compressed, str(out / "model.xml"))
        return [f"nncf {nncf.__version__}: compress_weights INT4_SYM ratio {RATIO}, data-aware"]
