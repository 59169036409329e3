"""ExecuTorch (XNNPACK) lowering: what the `.pte` holds, read back, against what the plan asked for.

A CIFAR-style ResNet hybrid must lower with every op inside the XNNPACK delegate, keep the plan's integer weights
and scales bit for bit, and agree with PyTorch; a tiny BERT with 4-bit linear layers and a mixed 8/4-bit embedding
must keep them at those widths in the artifact, agree with PyTorch, and list what stays outside the delegate.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("executorch")
pytest.importorskip("torchao")

from hpqdeploy import artifact  # noqa: E402
from hpqdeploy.config import ExportOptions
from hpqdeploy.errors import UserError  # noqa: E402
from hpqdeploy.lower.base import LoweringContext, get_runtime  # noqa: E402
from hpqdeploy.lower.executorch_quant import (DYNAMIC, STATIC, WEIGHT_ONLY, apply_torchao, float_twin,  # noqa: E402
                                              selection_layers)
from hpqdeploy.lower.export import run_export
from hpqdeploy.core.quantize import attach, calibrate, search_clip  # noqa: E402
from hpqdeploy.core.targets import load_target  # noqa: E402
from hpqdeploy.lower.legalize import SplitEmbedding, legalize  # noqa: E402
from hpqdeploy.lower.pte_reader import xnnpack_constants  # noqa: E402
from hpqdeploy.models.cifar_resnet import ChannelMapShortcut  # noqa: E402

from conftest import BERT_SEQ, BERT_VOCAB, bert_inputs, make_tiny_bert  # noqa: E402

TARGET = load_target("executorch")


@pytest.fixture(scope="module")
def resnet_hybrid(digits_hybrid, tmp_path_factory):
    out = tmp_path_factory.mktemp("et-resnet") / "hybrid-executorch"
    source = digits_hybrid / "hybrid"
    return source, out, run_export(source, out, ExportOptions("executorch", batch_size=1), quiet=True)


def test_resnet_hybrid_runs_entirely_in_xnnpack_and_agrees(resnet_hybrid):
    _, out, report = resnet_hybrid
    contents = report["contents"]
    assert contents["delegates"] == {"XnnpackBackend": 1}
    assert contents["non_delegated_ops"] == {}
    assert any(n.endswith("every op delegated to XNNPACK") for n in report["notes"]), report["notes"]
    assert contents["weights"].get("int8 per-channel", 0) > 0.9 * sum(contents["weights"].values())
    assert report["top1_agreement"] >= 0.95 and abs(report["accuracy_delta_points"]) <= 3.0, report
    assert [p.name for p in out.glob("*.pte")] == ["model_b1.pte"]


def test_resnet_artifact_holds_the_plans_integer_weights_and_scales(resnet_hybrid):
    source, out, _ = resnet_hybrid
    legal = copy.deepcopy(artifact.load(source).model.module).eval()
    legalize(legal, TARGET)
    twin, plans, _ = float_twin(legal)  # BN folded: the plan's integers, its scales times |gamma / sigma|
    # (the classifier runs with dynamic activations in the artifact; its int8 weights are the plan's all the same;
    # the shortcuts' one-hot channel selections run int8 beside them)
    stored = [c for c in xnnpack_constants(out / "model_b1.pte") if c.precision == "int8 per-channel"]
    assert len(stored) == sum(p.role == STATIC for p in plans.values()) + len(selection_layers(twin))
    for name, plan in plans.items():
        ints, scales = plan.params.int_weight.numpy(), plan.params.scales.flatten().numpy()
        layouts = [ints.transpose(0, 2, 3, 1), ints.transpose(1, 2, 3, 0)] if ints.ndim == 4 else [ints]
        match = [c for c in stored for lay in layouts if c.values.shape == lay.shape and (c.values == lay).all()]
        assert match, f"{name}: the plan's integer weights are not in the artifact"
        np.testing.assert_allclose(match[0].scales, scales, rtol=1e-6, err_msg=name)


def test_session_pads_short_batches_and_refuses_a_second_thread_count(resnet_hybrid):
    _, out, _ = resnet_hybrid
    runtime = get_runtime("executorch")
    session = runtime.load(out, threads=1)
    x = torch.randn(3, 1, 8, 8).numpy()
    together = session(x)
    one_by_one = np.concatenate([session(x[i:i + 1]) for i in range(3)])
    np.testing.assert_allclose(together, one_by_one)
    assert session.info()["threads"] == 1
    with pytest.raises(UserError, match="thread pool"):
        runtime.load(out, threads=2)


def test_unreadable_or_missing_programs_are_user_errors(tmp_path):
    runtime = get_runtime("executorch")
    with pytest.raises(UserError, match="no ExecuTorch program"):
        runtime.load(tmp_path)
    (tmp_path / "model_b1.pte").write_bytes(b"not a program")
    with pytest.raises(UserError, match="not a readable ExecuTorch program"):
        runtime.inspect(tmp_path)


def _tiny_bert_plan():
    """Tiny BERT: attention at 8 bits (static), the first FFN at 4 bits group 32, one FFN layer and the word embedding
    mixing 8 and 4 bits per neuron / token (split by legalization). Logits scaled up to a useful range."""
    model = make_tiny_bert(seed=0)
    with torch.no_grad():
        model.hf.classifier.weight.mul_(200)
    calib = [(bert_inputs(8, seed=20 + i), torch.zeros(8, dtype=torch.long)) for i in range(3)]
    layers = dict(model.named_modules())
    prefix = "hf.bert.encoder.layer."

    def quantize(name, bits, group=None, dynamic=False, act=8):
        m = attach(layers[name], torch.as_tensor(bits), act, group)
        m.act_dynamic = dynamic
        m.w_clip.copy_(search_clip(m.weight.detach(), m.w_bits, m.group_size))

    for i in range(2):
        for part in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            quantize(f"{prefix}{i}.{part}", [8] * 64)
    quantize(prefix + "0.intermediate.dense", [4] * 128, 32, True)
    quantize(prefix + "0.output.dense", [4] * 64, 32, True)
    quantize(prefix + "1.intermediate.dense", [8, 4] * 64, 32, True)
    quantize("hf.classifier", [8, 8])
    quantize("hf.bert.embeddings.word_embeddings", [8, 4] * (BERT_VOCAB // 2), 32, act=None)
    calibrate(model, calib)
    legalize(model, TARGET)
    return model.eval(), calib


def test_tiny_bert_keeps_4bit_linear_weights_and_agrees(tmp_path):
    model, calib = _tiny_bert_plan()
    runtime = get_runtime("executorch")
    ctx = LoweringContext(model, TARGET, bert_inputs(1, seed=7), calib, "text", (2,))
    lowered = runtime.lower(ctx, tmp_path)
    outside = [n for n in lowered.notes if "not delegated to XNNPACK" in n]
    assert outside and "aten::index_select" in outside[0] and "aten::native_layer_norm" in outside[0]

    contents = runtime.inspect(tmp_path)
    _, plans, _ = float_twin(model)
    four_bit = {n: p for n, p in plans.items() if p.params.bits == 4 and p.role != WEIGHT_ONLY}  # linear layers
    assert all(p.role == DYNAMIC for p in four_bit.values()) and len(four_bit) == 3
    assert contents["weights"]["int4 per-group 32"] == sum(p.params.int_weight.numel() for p in four_bit.values())
    assert contents["weights"]["int8 per-channel"] > 0 and contents["delegates"]["XnnpackBackend"] >= 1
    assert {"quantized_decomposed::embedding_byte.out", "quantized_decomposed::embedding_4bit.out"} <= \
        set(contents["non_delegated_ops"])
    for width in ("int8 per-channel", "int4 per-group 32"):  # half the tokens each, 64 wide
        assert contents["weights"][f"{width} (embedding, outside delegates)"] == BERT_VOCAB // 2 * 64
    stored = [c for c in xnnpack_constants(tmp_path / "model_b2.pte") if c.precision == "int4 per-group 32"]
    for name, plan in four_bit.items():
        ints = plan.params.int_weight.numpy()
        match = [c for c in stored if c.values.shape == ints.shape and (c.values == ints).all()]
        assert match, f"{name}: the plan's 4-bit integers are not in the artifact"
        np.testing.assert_allclose(match[0].scales, plan.params.scales.flatten().numpy(), rtol=2**-8)  # bf16

    session = runtime.load(tmp_path, threads=1)
    inputs = bert_inputs(5, seed=99)  # 5 rows through the batch-2 program: 2 + 2 + 1 padded
    got = session({k: v.numpy() for k, v in inputs.items()})
    with torch.no_grad():
        want = model(**inputs).numpy()
    assert got.shape == want.shape == (5, 2)
    assert np.abs(got - want).max() <= 0.05 * np.abs(want).max(), (got, want)


def test_a_whole_8bit_embedding_with_padding_idx_is_fused(tmp_path):
    """HF word embeddings carry padding_idx; at one width (e.g. --mixed layer) they must still reach ExecuTorch's
    quantized embedding kernel instead of leaving torchao::dequantize_affine, which has none."""
    model = make_tiny_bert(seed=0)
    emb = model.hf.bert.embeddings.word_embeddings
    assert emb.padding_idx is not None
    attach(emb, torch.full((BERT_VOCAB,), 8), None, None)
    legalize(model, TARGET)
    model.eval()
    runtime = get_runtime("executorch")
    runtime.lower(LoweringContext(model, TARGET, bert_inputs(1, seed=7), [], "text", (1,)), tmp_path)
    contents = runtime.inspect(tmp_path)
    assert "quantized_decomposed::embedding_byte.out" in contents["non_delegated_ops"]
    assert not [op for op in contents["non_delegated_ops"] if op.startswith("torchao")]
    assert emb.padding_idx is not None  # the lowering worked on a copy
    got = runtime.load(tmp_path, threads=1)({k: v[:1].numpy() for k, v in bert_inputs(1, seed=3).items()})
    with torch.no_grad():
        want = model(**{k: v[:1] for k, v in bert_inputs(1, seed=3).items()}).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4 + 1e-3 * np.abs(want).max())


def test_float_twin_rewrites_are_exact():
    torch.manual_seed(0)
    shortcut = ChannelMapShortcut(6, 10, stride=2)
    host = torch.nn.Sequential(shortcut)
    x = torch.randn(2, 6, 7, 7)
    want = host(x)
    twin, _, notes = float_twin(host)
    assert torch.equal(twin(x), want) and any("shortcut" in n for n in notes)

    emb = torch.nn.Embedding(BERT_VOCAB, 64)
    attach(emb, torch.tensor([8, 4] * (BERT_VOCAB // 2)), None, None)
    host = torch.nn.Sequential(emb)
    legalize(host, TARGET)
    ids = torch.randint(0, BERT_VOCAB, (3, BERT_SEQ))
    twin, plans, _ = float_twin(host)
    assert isinstance(host[0], SplitEmbedding) and {p.role for p in plans.values()} == {WEIGHT_ONLY}
    assert {(p.params.bits, p.params.group_size) for p in plans.values()} == {(8, None), (4, 32)}
    apply_torchao(twin, plans)  # the plan's integers and scales inside torchao's tensors: the plan's rows, exactly
    assert torch.equal(twin(ids), host(ids))
