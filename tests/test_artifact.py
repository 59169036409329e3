import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from hpqdeploy import artifact, atomic
from hpqdeploy.config import TrainConfig
from hpqdeploy.config import CompressOptions, DataOptions
from hpqdeploy.core.prune import GroupDecision, apply_pruning
from hpqdeploy.core.quantize import _QuantMixin, quantizable_layers
from hpqdeploy.core.targets import load_target
from hpqdeploy.data import DataRequest, load_data
from hpqdeploy.errors import UserError
from hpqdeploy.metrics import count_macs, count_params, weight_bytes
from hpqdeploy.models import rebuild_model
from hpqdeploy.models.spec import ModelSpec
from hpqdeploy.pipeline import run_compress, run_train

DIGITS = DataOptions("digits", calib_size=64, train_limit=256, eval_limit=100)


def _compress_capturing(baseline: Path, out: Path, opts: CompressOptions, data=None):
    """run_compress, also returning the in-memory model it saved."""
    captured = {}
    save = artifact.save

    def spy(out_dir, loaded, *args, **kwargs):
        captured["model"] = loaded.module
        return save(out_dir, loaded, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(artifact, "save", spy)
        metrics = run_compress(baseline, out, opts, data, quiet=True, command="pytest compress")
    return metrics, captured["model"]


@pytest.fixture(scope="module")
def hybrid(digits_baseline, tmp_path_factory):
    out = tmp_path_factory.mktemp("hybrid") / "hybrid"
    opts = CompressOptions(method="hybrid", calib_batches=1, train=TrainConfig(epochs=1, batch_size=64, distill=0.9))
    metrics, model = _compress_capturing(digits_baseline, out, opts)
    return out, metrics, model


def _digits_batch():
    splits = load_data("digits", DataRequest(calib_size=64, eval_limit=32))
    return torch.stack([splits.eval[i][0] for i in range(32)])


def test_baseline_artifact(digits_baseline):
    assert sorted(p.name for p in digits_baseline.iterdir()) == sorted(artifact.FILES)  # no checkpoint left over
    assert not atomic.partial_dir(digits_baseline).exists()
    a = artifact.load(digits_baseline)
    assert a.plan["method"] == "baseline" and a.plan["pruning"] == [] and a.plan["quantization"] == {}
    assert a.plan["model"] == {"family": "cifar_resnet", "name": "resnet20",
                               "args": {"num_classes": 10, "input_shape": [1, 8, 8]}}
    assert a.metrics["compression"] == 1.0
    assert a.metrics["params"] == count_params(a.model.module)
    assert a.model.module.conv1.in_channels == 1  # digits are grey
    assert a.metrics["fp32_bytes"] == a.metrics["bytes"]["total"] == 4 * a.metrics["params"]
    assert 0.0 <= a.metrics["accuracy"] <= 1.0 and a.metrics["eval_examples"] == 100
    assert len(a.metrics["history"]) == 1
    assert a.provenance["seed"] == 0 and a.provenance["command"] == "pytest digits_baseline"


def test_reload_reproduces_the_logits(hybrid):
    out, _, model = hybrid
    x = _digits_batch()
    model.eval()
    loaded = artifact.load(out).model.module
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_load_under_no_grad(hybrid):
    x = _digits_batch()
    with torch.no_grad():  # how deployment code loads a model
        a = artifact.load(hybrid[0])
        assert torch.equal(a.model.module(x), hybrid[2].eval()(x))


def test_reloaded_model_is_pruned_and_quantized(hybrid):
    out, _, model = hybrid
    loaded = artifact.load(out).model.module
    assert {n: tuple(p.shape) for n, p in loaded.named_parameters()} == \
        {n: tuple(p.shape) for n, p in model.named_parameters()}
    q = {n: m for n, m in quantizable_layers(loaded).items() if isinstance(m, _QuantMixin)}
    assert len(q) == len(quantizable_layers(loaded)) == 20  # 19 convs + the classifier
    for name, m in q.items():
        ref = model.get_submodule(name)
        assert torch.equal(m.w_bits, ref.w_bits) and torch.equal(m.w_clip, ref.w_clip)
        assert torch.equal(m.act_range, ref.act_range) and torch.isfinite(m.act_range).all()


def test_plan_json(hybrid):
    out, _, model = hybrid
    plan = json.loads((out / "plan.json").read_text())
    assert plan["method"] == "hybrid" and plan["target"] == "generic"
    generic = load_target(None)  # this machine's: recorded with the ISA family it was measured for
    assert plan["channel_multiple"] == generic.channel_multiple and plan["isa_family"] == generic.isa_family
    assert plan["data"]["name"] == "digits"
    pruning = {d["name"]: d for d in plan["pruning"]}
    assert any(d["kept"] < d["units"] for d in pruning.values())
    for name, d in pruning.items():
        assert model.get_submodule(name).out_channels == d["kept"]
        assert len(d["removed"]) == d["units"] - d["kept"]
        assert d["ratio"] == round(1 - d["kept"] / d["units"], 4)
    quant = plan["quantization"]
    assert set(quant) == set(quantizable_layers(model))
    widths = set()
    for name, q in quant.items():
        m = model.get_submodule(name)
        channels = sorted(c for run in q["bits"] for c in run["channels"])
        assert channels == list(range(m.weight.shape[0])) == list(range(q["out_channels"]))
        for run in q["bits"]:
            widths.add(run["bits"])
            assert all(int(m.w_bits[c]) == run["bits"] for c in run["channels"])
        assert len(q["scales"]) == len(q["clip"]) == q["out_channels"]
        assert all(s > 0 for s in q["scales"])
        # the observed range (the classifier's input, an average of ReLU outputs, may never reach 0); every
        # runtime and the fake quantizer widen it to hold 0 (tests/test_quantize.py)
        assert q["act_bits"] == 8 and q["act_range"][0] <= q["act_range"][1]
        assert q["op"] in ("Conv2d", "Linear")
    assert widths == {4, 8}
    assert set(plan["layer_sensitivity"]) == set(quant)
    # The recorded scales are the ones the saved weights give.
    assert artifact.describe_quantization(artifact.load(out).model.module) == quant


def test_metrics_json(hybrid, digits_baseline):
    out, returned, model = hybrid
    metrics = json.loads((out / "metrics.json").read_text())
    base = json.loads((digits_baseline / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(returned))
    assert metrics["format_version"] == 1
    loaded = artifact.load(out).model
    assert metrics["params"] == count_params(loaded.module) < base["params"]
    pruned = rebuild_model(ModelSpec.from_json(json.loads((out / "plan.json").read_text())["model"]))
    apply_pruning(pruned.module, pruned.example_inputs, [GroupDecision.from_json(d) for d in
                                                          json.loads((out / "plan.json").read_text())["pruning"]])
    assert metrics["macs"] == count_macs(pruned.module, pruned.example_inputs) < base["macs"]  # float MACs
    assert metrics["bytes"] == weight_bytes(loaded.module)
    assert metrics["fp32_bytes"] == base["fp32_bytes"]
    assert metrics["compression"] == round(base["fp32_bytes"] / metrics["bytes"]["total"], 3)
    assert metrics["compression"] > 8  # about half the weights at 4 bits, the rest 8, after pruning
    assert metrics["params_ratio"] == round(metrics["params"] / base["params"], 4) < 0.8
    assert metrics["bytes_ratio"] == round(metrics["bytes"]["total"] / base["fp32_bytes"], 4)
    assert metrics["macs_ratio"] < 1
    assert metrics["baseline"]["accuracy"] == base["accuracy"]
    assert metrics["accuracy_drop"] == round(base["accuracy"] - metrics["accuracy"], 4)
    assert 0.5 <= metrics["low_bit_share"] <= 0.6
    assert len(metrics["history"]) == 1


def test_provenance_json(hybrid, digits_baseline):
    out, _, _ = hybrid
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["command"] == "pytest compress"
    assert prov["seed"] == 0 and prov["baseline"] == str(digits_baseline)
    assert prov["config"]["method"] == "hybrid" and prov["config"]["prune_ratio"] == 0.3
    assert prov["config"]["data"]["name"] == "digits"
    assert {"torch", "torch-pruning", "numpy"} <= set(prov["versions"])
    assert prov["versions"]["torch"] in (torch.__version__.split("+")[0], torch.__version__)
    assert prov["python"] and prov["platform"] and prov["threads"] >= 1


def test_no_partial_dir_left(hybrid):
    out, _, _ = hybrid
    assert sorted(p.name for p in out.iterdir()) == sorted(artifact.FILES)
    assert not atomic.partial_dir(out).exists()
    assert [p.name for p in out.parent.iterdir()] == [out.name]


@pytest.mark.parametrize("method", ["prune", "quant"])
def test_prune_only_and_quant_only_round_trip(method, digits_baseline, tmp_path):
    opts = CompressOptions(method=method, calib_batches=1, train=TrainConfig(epochs=0))
    metrics, model = _compress_capturing(digits_baseline, tmp_path / method, opts)
    a = artifact.load(tmp_path / method)
    x = _digits_batch()
    with torch.no_grad():
        assert torch.equal(a.model.module(x), model.eval()(x))
    if method == "prune":
        assert a.plan["quantization"] == {} and metrics["params_ratio"] < 0.8 and metrics["low_bit_share"] == 0.0
        assert metrics["compression"] == pytest.approx(1 / metrics["params_ratio"], rel=0.01)
    else:
        assert a.plan["pruning"] == [] and metrics["params_ratio"] == 1.0 and metrics["compression"] > 5


# ---------------------------------------------------------------- broken artifacts


@pytest.fixture
def copy_of(tmp_path, hybrid):
    out = tmp_path / "copy"
    shutil.copytree(hybrid[0], out)
    return out


def test_corrupt_plan_json(copy_of):
    (copy_of / "plan.json").write_text('{"model": {"family": "cifar_resnet", ')
    with pytest.raises(UserError, match="corrupt"):
        artifact.load(copy_of)


def test_plan_without_model(copy_of):
    plan = json.loads((copy_of / "plan.json").read_text())
    del plan["model"]
    (copy_of / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(UserError, match="corrupt"):
        artifact.load(copy_of)


def test_plan_naming_unknown_layers(copy_of):
    plan = json.loads((copy_of / "plan.json").read_text())
    plan["pruning"][0]["name"] = "layer9.0.conv1"
    (copy_of / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(UserError, match="do not match"):
        artifact.load(copy_of)


@pytest.mark.parametrize("name", artifact.FILES)
def test_missing_file(name, copy_of):
    (copy_of / name).unlink()
    with pytest.raises(UserError, match=f"missing {name}"):
        artifact.load(copy_of)


def test_weights_of_another_model(copy_of, digits_baseline):
    shutil.copy(digits_baseline / "model.safetensors", copy_of / "model.safetensors")  # unpruned, unquantized
    with pytest.raises(UserError, match="weights do not match the plan"):
        artifact.load(copy_of)


@pytest.mark.parametrize("content", [b"", b"\x00" * 7, random.Random(0).randbytes(4096)],
                         ids=["empty", "short", "random"])
def test_unreadable_weights(content, copy_of):
    (copy_of / "model.safetensors").write_bytes(content)
    with pytest.raises(UserError, match="weights do not match the plan"):
        artifact.load(copy_of)


def test_not_a_directory(tmp_path):
    with pytest.raises(UserError, match="not a directory"):
        artifact.load(tmp_path / "nothing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        artifact.load(tmp_path / "file")
    with pytest.raises(UserError, match="missing model.safetensors, plan.json"):
        artifact.load(tmp_path)


def test_output_dir_exists(tmp_path, digits_baseline, hybrid):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="exists"):
        run_train("resnet20", DIGITS, taken, TrainConfig(epochs=0), quiet=True)
    with pytest.raises(UserError, match="exists"):
        run_compress(digits_baseline, taken, CompressOptions(train=TrainConfig(epochs=0)), quiet=True)
    with pytest.raises(UserError, match="exists"):
        run_compress(digits_baseline, hybrid[0], CompressOptions(train=TrainConfig(epochs=0)), quiet=True)
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    assert not atomic.partial_dir(taken).exists()


def test_compressing_a_compressed_artifact_is_refused(hybrid, tmp_path):
    with pytest.raises(UserError, match="hybrid artifact"):
        run_compress(hybrid[0], tmp_path / "again", CompressOptions(train=TrainConfig(epochs=0)), quiet=True)
    assert not (tmp_path / "again").exists() and not atomic.partial_dir(tmp_path / "again").exists()


@pytest.mark.parametrize("field, value", [("method", "nosuch"), ("prune_ratio", 0.0), ("prune_ratio", 1.0),
                                          ("importance", "nosuch"), ("target", "nosuch")])
def test_bad_options_are_refused_before_anything_is_written(field, value, digits_baseline, tmp_path):
    with pytest.raises(UserError, match=f"^{field} must be"):
        run_compress(digits_baseline, tmp_path / "out", CompressOptions(train=TrainConfig(epochs=0), **{field: value}),
                     quiet=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("distill, temperature", [(1.0, 4.0), (-0.1, 4.0), (0.5, 0.0)])
def test_bad_distillation_options(distill, temperature, digits_baseline, tmp_path):
    with pytest.raises(UserError, match="^(distill|temperature) must be"):
        run_compress(digits_baseline, tmp_path / "out",
                     CompressOptions(train=TrainConfig(epochs=0, distill=distill, temperature=temperature)), quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_bits_the_target_cannot_run_leave_nothing_behind(digits_baseline, tmp_path):
    opts = CompressOptions(bits=(4,), target="tensorrt", calib_batches=1, train=TrainConfig(epochs=0))
    with pytest.raises(UserError, match="tensorrt"):
        run_compress(digits_baseline, tmp_path / "out", opts, quiet=True)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- a text model: tokenizer and heads


WORDS = "good great fine fun bad awful dull poor the a movie film plot was is very not".split()


@pytest.fixture(scope="module")
def tiny_text_setup(tmp_path_factory):
    """A local Hugging Face directory (tiny BERT + word-piece tokenizer) and a tiny SST-2 in GLUE's tsv layout."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    root = tmp_path_factory.mktemp("text")
    hf_dir = root / "tiny-bert"
    hf_dir.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(str(hf_dir))
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=2,
                     vocab_size=5 + len(WORDS), num_labels=2, max_position_embeddings=64)
    BertForSequenceClassification(cfg).save_pretrained(str(hf_dir))
    data_dir = root / "sst2"
    data_dir.mkdir()
    rng = torch.Generator().manual_seed(0)
    for split, n in (("train", 96), ("dev", 24)):
        rows = ["sentence\tlabel"]
        for i in range(n):
            label = i % 2
            word = WORDS[int(torch.randint(0, 4, (1,), generator=rng)) + (0 if label else 4)]
            rows.append(f"the movie was very {word}\t{label}")
        (data_dir / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return hf_dir, data_dir


def test_head_dropout_is_set_at_train_and_kept_by_the_artifact(tiny_text_setup, tmp_path):
    hf_dir, data_dir = tiny_text_setup
    data = DataOptions("sst2", data_dir=str(data_dir), calib_size=16)
    cfg = TrainConfig(epochs=0, batch_size=16)
    run_train(str(hf_dir), data, tmp_path / "default", cfg, max_length=16, quiet=True)
    run_train(str(hf_dir), data, tmp_path / "low", cfg, max_length=16, quiet=True, head_dropout=0.1)
    assert artifact.load(tmp_path / "default").model.module.hf.dropout.p == 0.5  # the plan's
    assert artifact.load(tmp_path / "low").model.module.hf.dropout.p == 0.1  # rebuilt from the saved config
    with pytest.raises(UserError, match="saved artifact"):
        run_train(str(tmp_path / "low"), data, tmp_path / "again", cfg, max_length=16, quiet=True, head_dropout=0.2)
    with pytest.raises(UserError, match=r"--dropout must be in \[0, 1\)"):
        run_train(str(hf_dir), data, tmp_path / "bad", cfg, max_length=16, quiet=True, head_dropout=1.0)
    assert not (tmp_path / "again").exists() and not (tmp_path / "bad").exists()


def test_text_artifact_round_trip(tiny_text_setup, tmp_path):
    hf_dir, data_dir = tiny_text_setup
    source = tmp_path / "source"
    shutil.copytree(hf_dir, source)
    data = DataOptions("sst2", data_dir=str(data_dir), calib_size=16)
    run_train(str(source), data, tmp_path / "base", TrainConfig(epochs=1, lr=5e-5, batch_size=16), max_length=16,
              quiet=True)
    assert (tmp_path / "base" / "tokenizer").is_dir()
    opts = CompressOptions(method="hybrid", prune_ratio=0.5, calib_batches=1,
                           train=TrainConfig(epochs=1, lr=5e-5, batch_size=16))
    metrics, model = _compress_capturing(tmp_path / "base", tmp_path / "hybrid", opts)
    shutil.rmtree(tmp_path / "base")  # the compressed artifact needs neither its baseline nor the model's source
    shutil.rmtree(source)
    a = artifact.load(tmp_path / "hybrid")
    assert a.model.tokenizer is not None
    enc = a.model.tokenizer(["the movie was very good", "a dull plot"], padding=True, return_tensors="pt")
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    assert (enc["input_ids"] != 1).all()  # every word is in the saved vocabulary, none is [UNK]
    with torch.no_grad():
        assert torch.equal(a.model.module(**inputs), model.eval()(**inputs))
    kinds = {}
    for d in a.plan["pruning"]:
        kinds.setdefault(d["kind"], []).append(d["kept"])
    assert kinds == {"heads": [2, 2], "ffn": [64, 64]}
    for layer in a.model.module.hf.bert.encoder.layer:
        assert layer.attention.self.num_attention_heads == 2 and layer.attention.self.query.out_features == 32
        assert layer.intermediate.dense.out_features == 64
    assert metrics["params_ratio"] < 1 and metrics["compression"] > 4


def test_read_state_dict_turns_any_unreadable_file_into_one_user_error(tmp_path):
    """Foreign bytes make the weights-only unpickler raise IndexError, KeyError, UnicodeDecodeError, ... (CI once hit
    an IndexError from random bytes); every one must reach the user as the same one-line error, never a traceback."""
    from hpqdeploy.models.spec import read_state_dict

    good = tmp_path / "good.th"
    torch.save({"state_dict": {"w": torch.ones(3)}}, good)
    assert torch.equal(read_state_dict(good)["w"], torch.ones(3))
    whole = good.read_bytes()
    blobs = [random.Random(seed).randbytes(4096) for seed in range(200)]
    blobs += [whole[:cut] for cut in range(0, len(whole), max(1, len(whole) // 50))]
    blobs += [b"", b"\x80\x02]q\x00(", b"PK\x03\x04" + bytes(100)]
    for i, blob in enumerate(blobs):
        path = tmp_path / f"bad{i}.th"
        path.write_bytes(blob)
        with pytest.raises(UserError, match="not a readable PyTorch checkpoint|not a state_dict"):
            read_state_dict(path)
    torch.save([torch.ones(1)], tmp_path / "list.th")
    with pytest.raises(UserError, match="holds a list, not a state_dict"):
        read_state_dict(tmp_path / "list.th")


def test_weights_from_safetensors_continue_a_baseline(tmp_path):
    """`--weights` takes a `.safetensors` file, e.g. a `train` output's model.safetensors, to continue training it."""
    from safetensors.torch import save_file

    from hpqdeploy.models import load_model

    first = load_model("resnet8", num_classes=10, pretrained=False).module
    save_file(first.state_dict(), str(tmp_path / "model.safetensors"))
    again = load_model("resnet8", num_classes=10, weights=tmp_path / "model.safetensors").module
    for (name, a), b in zip(first.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_model("resnet8", num_classes=10, weights=bad)
    with pytest.raises(UserError, match="does not fit resnet20"):
        load_model("resnet20", num_classes=10, weights=tmp_path / "model.safetensors")


def test_a_local_model_whose_head_has_other_labels_is_a_one_line_error(tiny_text_setup, tmp_path):
    """A local Hugging Face model trained for 3 labels, given 2-class data: refused before anything is written."""
    from transformers import BertForSequenceClassification

    hf_dir, data_dir = tiny_text_setup
    three = tmp_path / "three-labels"
    shutil.copytree(hf_dir, three)
    model = BertForSequenceClassification.from_pretrained(str(hf_dir), num_labels=3, ignore_mismatched_sizes=True)
    model.save_pretrained(str(three))
    data = DataOptions("sst2", data_dir=str(data_dir), calib_size=16)
    with pytest.raises(UserError, match="classification head has 3 labels; the data has 2 classes") as exc:
        run_train(str(three), data, tmp_path / "out", TrainConfig(epochs=0, batch_size=16), max_length=16,
                  quiet=True)
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_a_hub_name_with_the_hub_unreachable_fails_at_once(monkeypatch):
    """Not cached, not offline by setting, and no route to the hub: one line, without transformers' retries."""
    import socket

    import transformers

    from hpqdeploy.models import hf_text

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: (_ for _ in ()).throw(OSError("no route")))

    def no_download(*_a, **_k):
        raise AssertionError("the hub was tried")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_download)
    with pytest.raises(UserError, match="not in the local cache and the hub .* is unreachable") as exc:
        hf_text.build("someone/not-cached-model", num_classes=2, pretrained=True)
    assert "\n" not in str(exc.value)


def test_files_carry_a_format_version_and_a_newer_one_is_a_one_line_error(digits_quant, tmp_path):
    for name in ("plan.json", "metrics.json"):
        assert json.loads((digits_quant / name).read_text())["format_version"] == 1
    for name in ("plan.json", "metrics.json"):
        future = tmp_path / f"future-{name}"
        shutil.copytree(digits_quant, future)
        blob = json.loads((future / name).read_text())
        (future / name).write_text(json.dumps({**blob, "format_version": 2}))
        with pytest.raises(UserError, match=f"{name}: format version 2; this hpqdeploy reads {name} versions 1 to 1") \
                as exc:
            artifact.load(future)
        assert "\n" not in str(exc.value)


def test_a_plan_naming_a_layer_the_model_lacks_is_a_one_line_error(digits_quant, tmp_path):
    edited = tmp_path / "edited"
    shutil.copytree(digits_quant, edited)
    plan = json.loads((edited / "plan.json").read_text())
    plan["quantization"]["layer9.0.conv1"] = next(iter(plan["quantization"].values()))
    (edited / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(UserError, match="quantizes layer 'layer9.0.conv1', which the model does not have") as exc:
        artifact.load(edited)
    assert "\n" not in str(exc.value)
