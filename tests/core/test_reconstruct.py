"""Least-squares reconstruction after one-shot pruning: it brings the pruned model back towards the original."""

import copy

import torch

from hpqdeploy.core.importance import output_divergence, reference_outputs
from hpqdeploy.core.prune import apply_pruning, plan_pruning
from hpqdeploy.core.reconstruct import reconstruct


def _pruned(model, example, calib, ratio, multiple):
    decisions = plan_pruning(model, example, calib, ratio, multiple, "taylor")
    return decisions, apply_pruning(copy.deepcopy(model), example, decisions)


def test_resnet_layers_that_lost_inputs_are_refitted(tiny_resnet, resnet_example, resnet_calib):
    decisions, pruned = _pruned(tiny_resnet, resnet_example, resnet_calib, 0.3, 8)
    untouched = {n: m.weight.clone() for n, m in pruned.named_modules()
                 if isinstance(m, torch.nn.Conv2d) and m.in_channels == tiny_resnet.get_submodule(n).in_channels}
    reference = reference_outputs(tiny_resnet, resnet_calib)
    before = output_divergence(pruned, resnet_calib, reference)
    report = reconstruct(pruned, tiny_resnet, resnet_example, decisions, resnet_calib)
    assert report and all(r["error_after"] < r["error_before"] for r in report.values())
    assert set(report) == {n for n, m in pruned.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
                           and n not in untouched}  # every layer that lost inputs, and only those
    for n, w in untouched.items():
        assert torch.equal(pruned.get_submodule(n).weight, w)
    assert output_divergence(pruned, resnet_calib, reference) < 0.2 * before


def test_bert_output_projections_are_refitted(tiny_bert, bert_example, bert_calib):
    decisions, pruned = _pruned(tiny_bert, bert_example, bert_calib, 0.5, 1)
    reference = reference_outputs(tiny_bert, bert_calib)
    before = output_divergence(pruned, bert_calib, reference)
    report = reconstruct(pruned, tiny_bert, bert_example, decisions, bert_calib)
    assert {n.rsplit(".", 2)[-2] for n in report} == {"output"}  # attention output and FFN output projections
    assert all(r["error_after"] < r["error_before"] for r in report.values())
    assert output_divergence(pruned, bert_calib, reference) < before


def test_nothing_pruned_nothing_refitted(tiny_resnet, resnet_example, resnet_calib):
    pruned = copy.deepcopy(tiny_resnet)
    assert reconstruct(pruned, tiny_resnet, resnet_example, [], resnet_calib) == {}
    for (_, a), (_, b) in zip(pruned.state_dict().items(), tiny_resnet.state_dict().items()):
        assert torch.equal(a, b)
