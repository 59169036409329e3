import pytest
import torch

from hpqdeploy.core.importance import (CRITERIA, accumulate_gradients, channel_criterion, divergence_after,
                                  output_divergence, reference_outputs, squared_gradients)
from hpqdeploy.errors import UserError
from hpqdeploy.core.prune import build_graph, find_groups, plan_pruning, score_groups


def _scored(model, example, criterion):
    graph = build_graph(model, example)
    groups = find_groups(model, graph)
    score_groups(model, graph, groups, criterion)
    return {g.name: g for g in groups}


def test_criteria_by_name():
    assert set(CRITERIA) == {"magnitude", "taylor"}
    for name in CRITERIA:
        assert callable(channel_criterion(name))


@pytest.mark.parametrize("bad", ["nosuch", "", "Magnitude"])
def test_unknown_criterion_is_a_user_error(bad, tiny_resnet, resnet_example, resnet_calib):
    with pytest.raises(UserError, match="unknown importance criterion"):
        channel_criterion(bad)
    with pytest.raises(UserError):
        plan_pruning(tiny_resnet, resnet_example, resnet_calib, 0.3, 8, bad)


@pytest.mark.parametrize("criterion", CRITERIA)
def test_one_score_per_unit_resnet(criterion, tiny_resnet, resnet_example, resnet_calib):
    if criterion == "taylor":
        accumulate_gradients(tiny_resnet, resnet_calib)
    groups = _scored(tiny_resnet, resnet_example, criterion)
    assert set(groups) == {"conv1", "layer1.0.conv1", "layer2.0.conv1", "layer2.0.conv2", "layer3.0.conv1",
                           "layer3.0.conv2"}
    for g in groups.values():
        assert g.importance.shape == (g.units,)
        assert g.units == g.root.out_channels
        assert torch.isfinite(g.importance).all() and (g.importance >= 0).all() and g.importance.sum() > 0


@pytest.mark.parametrize("criterion", CRITERIA)
def test_one_score_per_head_and_neuron_bert(criterion, tiny_bert, bert_example, bert_calib):
    if criterion == "taylor":
        accumulate_gradients(tiny_bert, bert_calib)
    groups = _scored(tiny_bert, bert_example, criterion)
    kinds = sorted((g.kind, g.units, g.unit_channels) for g in groups.values())
    assert kinds == [("ffn", 128, 1)] * 2 + [("heads", 4, 16)] * 2
    for g in groups.values():
        assert g.importance.shape == (g.units,)
        assert (g.importance > 0).all()


def _zero_channel(model, c):
    """Zero every weight coupled to channel c of layer1.0's inner conv (its filter, BN, and the next conv's input)."""
    block = model.layer1[0]
    with torch.no_grad():
        block.conv1.weight[c] = 0
        block.bn1.weight[c] = 0
        block.bn1.bias[c] = 0
        block.conv2.weight[:, c] = 0


@pytest.mark.parametrize("c", [0, 5, 15])
def test_zeroed_channel_is_least_important_by_magnitude(c, tiny_resnet, resnet_example):
    _zero_channel(tiny_resnet, c)
    scores = _scored(tiny_resnet, resnet_example, "magnitude")["layer1.0.conv1"].importance
    assert int(torch.argmin(scores)) == c
    assert scores[c] == 0
    assert (torch.cat([scores[:c], scores[c + 1:]]) > 0).all()


def test_zeroed_channel_is_least_important_by_taylor(tiny_resnet, resnet_example, resnet_calib):
    _zero_channel(tiny_resnet, 3)
    accumulate_gradients(tiny_resnet, resnet_calib)
    scores = _scored(tiny_resnet, resnet_example, "taylor")["layer1.0.conv1"].importance
    assert int(torch.argmin(scores)) == 3 and scores[3] == 0


def test_taylor_reads_the_gradients(tiny_resnet, resnet_example, resnet_calib):
    for p in tiny_resnet.parameters():
        p.grad = torch.zeros_like(p)
    before = _scored(tiny_resnet, resnet_example, "taylor")
    assert all(g.importance.sum() == 0 for g in before.values())  # no gradient, no Taylor importance

    accumulate_gradients(tiny_resnet, resnet_calib)
    once = _scored(tiny_resnet, resnet_example, "taylor")
    assert all(g.importance.sum() > 0 for g in once.values())

    accumulate_gradients(tiny_resnet, resnet_calib + resnet_calib)  # the same batches twice: gradients double
    twice = _scored(tiny_resnet, resnet_example, "taylor")
    for name, g in once.items():
        assert torch.allclose(twice[name].importance, 2 * g.importance, rtol=1e-4)

    magnitude = _scored(tiny_resnet, resnet_example, "magnitude")  # magnitude ignores gradients
    for p in tiny_resnet.parameters():
        p.grad = None
    again = _scored(tiny_resnet, resnet_example, "magnitude")
    for name, g in magnitude.items():
        assert torch.equal(again[name].importance, g.importance)


def test_accumulate_gradients_restores_mode_and_sums(tiny_resnet, resnet_calib):
    tiny_resnet.train()
    accumulate_gradients(tiny_resnet, resnet_calib[:1])
    g1 = tiny_resnet.conv1.weight.grad.clone()
    accumulate_gradients(tiny_resnet, resnet_calib[1:2])
    g2 = tiny_resnet.conv1.weight.grad.clone()
    accumulate_gradients(tiny_resnet, resnet_calib[:2])
    assert tiny_resnet.training
    assert torch.allclose(tiny_resnet.conv1.weight.grad, g1 + g2, atol=1e-6)


def test_squared_gradients_is_the_mean_of_squares(tiny_resnet, resnet_calib):
    layers = [tiny_resnet.conv1, tiny_resnet.linear]
    tiny_resnet.train()
    fisher = squared_gradients(tiny_resnet, resnet_calib[:2], layers)
    assert tiny_resnet.training  # the caller's mode comes back
    expected = torch.zeros_like(tiny_resnet.linear.weight)
    for batch in resnet_calib[:2]:
        accumulate_gradients(tiny_resnet, [batch])
        expected += tiny_resnet.linear.weight.grad ** 2
    assert set(fisher) == set(layers)
    assert torch.allclose(fisher[tiny_resnet.linear], expected / 2, rtol=1e-5)


def test_divergence_after_measures_and_undoes(tiny_resnet, resnet_calib):
    linear = tiny_resnet.linear
    original = linear.weight.detach().clone()
    reference = reference_outputs(tiny_resnet, resnet_calib)
    assert [r.shape for r in reference] == [(8, 4)] * 3
    assert all(torch.allclose(r.exp().sum(1), torch.ones(8)) for r in reference)  # log-probabilities

    def zero_classifier():
        saved_w, saved_b = linear.weight.data.clone(), linear.bias.data.clone()
        linear.weight.data.zero_()
        linear.bias.data.zero_()

        def undo():
            linear.weight.data.copy_(saved_w)
            linear.bias.data.copy_(saved_b)

        return undo

    divergence = divergence_after(tiny_resnet, resnet_calib, reference, zero_classifier)
    # Zero logits predict the uniform distribution: KL(p || uniform) = sum p log p + log 4, averaged over examples.
    ref = torch.cat(reference)
    expected = (ref.exp() * ref).sum(1).mean() + torch.log(torch.tensor(4.0))
    assert divergence == pytest.approx(expected.item(), rel=1e-4)
    assert divergence > 0.01
    assert torch.equal(linear.weight, original)
    assert output_divergence(tiny_resnet, resnet_calib, reference) == pytest.approx(0.0, abs=1e-6)


def test_divergence_is_never_negative(tiny_resnet, resnet_calib):
    reference = reference_outputs(tiny_resnet, resnet_calib)
    for scale in (0.5, 0.99, 1.01, 2.0):
        def rescale(scale=scale):
            tiny_resnet.linear.weight.data.mul_(scale)
            return lambda: tiny_resnet.linear.weight.data.div_(scale)

        assert divergence_after(tiny_resnet, resnet_calib, reference, rescale) > 0
    tiny_resnet.train()
    reference_outputs(tiny_resnet, resnet_calib)
    assert tiny_resnet.training  # mode restored
