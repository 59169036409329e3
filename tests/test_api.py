"""The Python API on models in memory: plan as data, apply, the user's own loop, save/load, and that `compress`
is built of the same calls."""

import json

import pytest
import torch

import hpqdeploy as hq
from hpqdeploy.errors import UserError
from hpqdeploy.metrics import count_params
from hpqdeploy.training.loop import loader


def _calibration(base, batches=2, batch_size=64):
    data = hq.DataOptions(**base.plan["data"])
    splits = hq.load_data(data)
    return data, splits, list(loader(splits.calib, base.model.collate, batch_size, shuffle=False))[:batches]


def test_plan_apply_own_loop_save_load_round_trip(digits_baseline, tmp_path):
    base = hq.load(digits_baseline)
    loaded = base.model
    data, splits, calib = _calibration(base)
    before = count_params(loaded.module)
    plan = hq.plan(loaded.module, loaded.example_inputs, calib,
                   hq.CompressOptions(method="hybrid", prune_ratio=0.5, target="onnxruntime"))
    assert count_params(loaded.module) == before  # planning does not touch the model
    plan = json.loads(json.dumps(plan))  # plain data
    assert plan["method"] == "hybrid" and plan["target"] == "onnxruntime"
    assert any(g["removed"] for g in plan["pruning"]) and plan["bits"]

    model = hq.apply(loaded.module, plan, calib)
    assert count_params(model) < before
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)  # the user's own loop: fake quantization trains
    model.train()
    for inputs, labels in calib:
        loss = torch.nn.functional.cross_entropy(model(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    evaluation = list(loader(splits.eval, loaded.collate, 50, shuffle=False))
    out = hq.save(model, plan, tmp_path / "hybrid", source=loaded, data=data, evaluation=evaluation, baseline=base)
    again = hq.load(out)
    model.eval()
    x = calib[0][0]
    torch.testing.assert_close(again.model.module(x), model(x))
    assert again.plan["pruning"] == plan["pruning"] and again.plan["method"] == "hybrid"
    assert again.metrics["accuracy"] == pytest.approx(hq.evaluate(model, evaluation)["accuracy"])
    assert again.metrics["params_ratio"] < 1 and again.metrics["macs_ratio"] < 1
    assert not (tmp_path / "hybrid.partial").exists()


def test_compress_makes_the_plan_the_api_makes(digits_baseline, tmp_path):
    """`compress` is built of `plan`'s calls: the same baseline, calibration and options give the same decisions."""
    from hpqdeploy.pipeline import run_compress

    opts = hq.CompressOptions(method="hybrid", prune_ratio=0.4, calib_batches=2,
                              train=hq.TrainConfig(epochs=0, batch_size=64))
    run_compress(digits_baseline, tmp_path / "c", opts, quiet=True)
    written = hq.load(tmp_path / "c").plan
    base = hq.load(digits_baseline)
    torch.manual_seed(0)
    _, _, calib = _calibration(base)
    plan = hq.plan(base.model.module, base.model.example_inputs, calib, opts)
    assert plan["pruning"] == written["pruning"]
    assert {n: b["sensitivity"] for n, b in plan["bits"].items()} == written["layer_sensitivity"]
    runs = {n: q["bits"] for n, q in written["quantization"].items()}
    assert {n: b["bits"] for n, b in plan["bits"].items()} == runs


def test_a_plan_from_the_future_or_for_another_model_is_one_line(digits_baseline, tiny_resnet, resnet_calib):
    base = hq.load(digits_baseline)
    _, _, calib = _calibration(base, batches=1)
    plan = hq.plan(base.model.module, base.model.example_inputs, calib, hq.CompressOptions(method="quant"))
    with pytest.raises(UserError, match="format version 99"):
        hq.apply(base.model.module, {**plan, "format_version": 99}, calib)
    with pytest.raises(UserError, match="which the model does not have"):
        hq.apply(base.model.module, {**plan, "bits": {"no.such.layer": next(iter(plan["bits"].values()))}}, calib)
    with pytest.raises(UserError, match="not a compression plan"):
        hq.apply(base.model.module, {"method": "hybrid"}, calib)


def test_configurations_are_frozen_and_checked_on_construction():
    opts = hq.CompressOptions(prune_ratio=0.2, bits=[8, 4])
    assert opts.bits == (8, 4)
    with pytest.raises(AttributeError):
        opts.prune_ratio = 0.5  # type: ignore[misc]
    with pytest.raises(UserError, match=r"prune_ratio must be in \(0, 1\), got 1.5"):
        hq.CompressOptions(prune_ratio=1.5)
    with pytest.raises(UserError, match="reconstruct .* does not go with fade"):
        hq.CompressOptions(reconstruct=True, fade=0.5)
    with pytest.raises(UserError, match="eval_limit must be >= 1"):
        hq.DataOptions(name="digits", eval_limit=0)
