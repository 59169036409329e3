import copy
import json

import pytest
import torch
import torch.nn as nn

from hpqdeploy.core.prune import (ChannelMapShortcutPruner, FadeOut, GroupDecision, _Group, allocate, apply_pruning,
                             build_graph, candidates, find_groups, plan_pruning)
from hpqdeploy.hooks import forward
from hpqdeploy.models.cifar_resnet import ChannelMapShortcut

RESNET_GROUPS = {  # group name -> (units, the BN layers whose output is the group's channels)
    "conv1": (16, ["bn1", "layer1.0.bn2"]),  # stage-1 residual stream
    "layer1.0.conv1": (16, ["layer1.0.bn1"]),
    "layer2.0.conv1": (32, ["layer2.0.bn1"]),
    "layer2.0.conv2": (32, ["layer2.0.bn2"]),  # stage-2 stream (with the shortcut's output channels)
    "layer3.0.conv1": (64, ["layer3.0.bn1"]),
    "layer3.0.conv2": (64, ["layer3.0.bn2"]),  # stage-3 stream, read by the classifier
}


def _shapes(model):
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def test_resnet_groups_cover_every_coupled_set(tiny_resnet, resnet_example):
    graph = build_graph(tiny_resnet, resnet_example)
    groups = {g.name: g for g in find_groups(tiny_resnet, graph)}
    assert {n: g.units for n, g in groups.items()} == {n: u for n, (u, _) in RESNET_GROUPS.items()}
    assert all(g.kind == "channels" and g.unit_channels == 1 for g in groups.values())


def test_plan_and_apply_shrink_the_resnet(tiny_resnet, resnet_example, resnet_calib):
    before = _shapes(tiny_resnet)
    reference = copy.deepcopy(tiny_resnet)
    decisions = plan_pruning(tiny_resnet, resnet_example, resnet_calib, 0.3, 8, "taylor")
    assert _shapes(tiny_resnet) == before  # planning leaves the model alone
    assert all(torch.equal(p, q) for p, q in zip(tiny_resnet.parameters(), reference.parameters()))
    apply_pruning(tiny_resnet, resnet_example, decisions)
    kept = {d.name: d.kept for d in decisions}
    assert sum(tiny_resnet.get_submodule(n).out_channels for n in kept) < sum(u for u, _ in RESNET_GROUPS.values())
    for name, k in kept.items():
        assert tiny_resnet.get_submodule(name).out_channels == k
        for bn in RESNET_GROUPS[name][1]:
            assert tiny_resnet.get_submodule(bn).num_features == k
    assert tiny_resnet.layer1[0].conv1.in_channels == kept["conv1"]
    assert tiny_resnet.layer2[0].conv1.in_channels == kept["conv1"]
    assert tiny_resnet.layer2[0].shortcut.in_channels == kept["conv1"]
    assert tiny_resnet.layer2[0].shortcut.out_channels == kept["layer2.0.conv2"]
    assert tiny_resnet.linear.in_features == kept["layer3.0.conv2"]
    assert tiny_resnet.linear.out_features == 4  # the classifier's classes are never pruned
    x = torch.randn(5, 3, 16, 16)
    assert tiny_resnet(x).shape == reference(x).shape == (5, 4)
    assert sum(p.numel() for p in tiny_resnet.parameters()) < 0.8 * sum(p.numel() for p in reference.parameters())


@pytest.mark.parametrize("criterion", ["magnitude", "taylor"])
def test_kept_counts_are_multiples_and_ratios_recorded(criterion, tiny_resnet, resnet_example, resnet_calib):
    decisions = plan_pruning(tiny_resnet, resnet_example, resnet_calib, 0.3, 8, criterion)
    assert sorted(d.name for d in decisions) == sorted(RESNET_GROUPS)
    assert any(d.kept < d.units for d in decisions)
    for d in decisions:
        assert d.kept % 8 == 0 and 0 < d.kept <= d.units
        assert d.kept in candidates(d.units, d.unit_channels, 0.3, 8)
        assert len(d.removed) == d.units - d.kept == len(set(d.removed))
        assert all(0 <= u < d.units for u in d.removed)
        assert d.ratio == pytest.approx(1 - d.kept / d.units)
        assert d.to_json()["ratio"] == round(d.ratio, 4)
        assert d.sensitivity is not None


def test_multiple_of_16(tiny_resnet, resnet_example, resnet_calib):
    decisions = plan_pruning(tiny_resnet, resnet_example, resnet_calib, 0.3, 16, "magnitude")
    for d in decisions:
        assert d.kept % 16 == 0
    assert {d.name: d.kept for d in decisions}["conv1"] == 16  # 16 channels cannot lose a block of 16


def _silence(model, group, channels):
    """Make `channels` of a group contribute nothing: zero the scale and shift of every BN that produces them."""
    with torch.no_grad():
        for bn in RESNET_GROUPS[group][1]:
            m = model.get_submodule(bn)
            m.weight[channels] = 0
            m.bias[channels] = 0


# Channels to remove per group. In the stage-2/3 streams the shortcut adds the previous stage's channels on the
# middle of the range (zero padding on both sides), so the silenced channels are taken from the padded ends.
SILENT = {
    "conv1": [0, 3, 9, 10, 11, 12, 13, 15],
    "layer1.0.conv1": [1, 2, 4, 8, 14, 15, 6, 7],
    "layer2.0.conv1": [0, 5, 6, 17, 20, 21, 30, 31],
    "layer2.0.conv2": [0, 1, 2, 7, 24, 26, 29, 31],
    "layer3.0.conv1": list(range(0, 64, 4)),
    "layer3.0.conv2": [0, 1, 2, 3, 5, 8, 13, 15, 48, 50, 52, 60, 61, 62, 63, 49],
}


@pytest.mark.parametrize("groups", [["conv1"], ["layer2.0.conv2"], ["layer3.0.conv2"], list(SILENT)])
def test_pruning_silent_channels_keeps_the_function(groups, tiny_resnet, resnet_example):
    for g in groups:
        _silence(tiny_resnet, g, SILENT[g])
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = tiny_resnet(x)
    decisions = [GroupDecision(g, "channels", RESNET_GROUPS[g][0], RESNET_GROUPS[g][0] - len(SILENT[g]),
                               removed=sorted(SILENT[g])) for g in groups]
    apply_pruning(tiny_resnet, resnet_example, decisions)
    for g in groups:
        assert tiny_resnet.get_submodule(g).out_channels == RESNET_GROUPS[g][0] - len(SILENT[g])
    with torch.no_grad():
        got = tiny_resnet(x)
    assert torch.allclose(got, expected, atol=1e-5)


def test_pruning_live_channels_changes_the_function(tiny_resnet, resnet_example):
    """The control for the test above: removing channels that do contribute must change the outputs."""
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = tiny_resnet(x)
    apply_pruning(tiny_resnet, resnet_example,
                  [GroupDecision("layer2.0.conv2", "channels", 32, 24, removed=[8, 9, 10, 11, 12, 13, 14, 15])])
    with torch.no_grad():
        assert not torch.allclose(tiny_resnet(x), expected, atol=1e-3)


def test_pruning_the_stream_remaps_the_next_stage_shortcut(tiny_resnet, resnet_example):
    apply_pruning(tiny_resnet, resnet_example, [GroupDecision("conv1", "channels", 16, 8, removed=SILENT["conv1"])])
    source = tiny_resnet.layer2[0].shortcut.source
    # 16 -> 32 channels, padded 8 on each side; survivors of the 16 are renumbered 0..7 in order.
    kept = [c for c in range(16) if c not in SILENT["conv1"]]
    expected = torch.full((32,), -1)
    for new, old in enumerate(kept):
        expected[8 + old] = new
    assert source.tolist() == expected.tolist()


def test_channel_map_shortcut_rule_in_channels():
    sc = ChannelMapShortcut(4, 8, stride=2)
    assert sc.source.tolist() == [-1, -1, 0, 1, 2, 3, -1, -1]
    x = torch.randn(2, 4, 6, 6)
    silenced = x.clone()
    silenced[:, 1] = 0
    expected = sc(silenced)
    ChannelMapShortcutPruner().prune_in_channels(sc, [1])
    assert sc.source.tolist() == [-1, -1, 0, -1, 1, 2, -1, -1]
    assert sc.in_channels == 3 and ChannelMapShortcutPruner().get_in_channels(sc) == 3
    assert torch.equal(sc(x[:, [0, 2, 3]]), expected)


def test_channel_map_shortcut_rule_out_channels():
    sc = ChannelMapShortcut(4, 8, stride=1)
    x = torch.randn(2, 4, 3, 3)
    full = sc(x)
    ChannelMapShortcutPruner().prune_out_channels(sc, [0, 3, 7])
    assert sc.source.tolist() == [-1, 0, 2, 3, -1]
    assert sc.out_channels == 5 and sc.in_channels == 4
    assert torch.equal(sc(x), full[:, [1, 2, 4, 5, 6]])


def test_channel_map_shortcut_rule_both_ways():
    sc = ChannelMapShortcut(4, 8, stride=1)
    x = torch.randn(1, 4, 2, 2)
    full = sc(x)
    pruner = ChannelMapShortcutPruner()
    pruner.prune_in_channels(sc, [0, 2])
    pruner.prune_out_channels(sc, [1, 5])
    assert sc.source.tolist() == [-1, -1, 0, -1, -1, -1]
    assert torch.equal(sc(x[:, [1, 3]])[:, 2], full[:, 3])
    assert sc(x[:, [1, 3]]).abs()[:, [0, 1, 3, 4, 5]].sum() == 0


@pytest.mark.parametrize("units, unit_channels, ratio, multiple, expected", [
    (16, 1, 0.3, 8, [8, 16]),
    (64, 1, 0.3, 8, [40, 48]),
    (32, 1, 0.25, 8, [24]),
    (8, 1, 0.5, 8, [8]),  # no smaller multiple: unpruned
    (16, 1, 0.3, 16, [16]),
    (12, 32, 0.5, 8, [6]),  # heads of 32 channels: any head count is a multiple of 8 channels
    (4, 4, 0.3, 8, [2, 4]),  # heads of 4 channels: an even number of heads
    (1536, 1, 0.3, 8, [1072, 1080]),
    (16, 1, 0.95, 8, [8]),  # never below one block
])
def test_candidates(units, unit_channels, ratio, multiple, expected):
    got = candidates(units, unit_channels, ratio, multiple)
    assert got == expected
    assert all(k == units or (k * unit_channels) % multiple == 0 for k in got)


def _group(name, units, importance=None):
    imp = importance if importance is not None else torch.arange(1.0, units + 1)
    return _Group(name, "channels", nn.Identity(), units, 1, imp)


def _linear_share(groups, cost):
    """A toy cost: each group's units cost `cost[name]` each, independently of the others."""
    total = sum(g.units * cost[g.name] for g in groups) or 1.0
    return lambda fractions: sum(g.units * cost[g.name] * fractions.get(g.name, 1.0) for g in groups) / total


def test_allocate_prunes_the_less_sensitive_group_more():
    groups = [_group("a", 16), _group("b", 16)]
    share = _linear_share(groups, {"a": 1.0, "b": 1.0})
    # candidates {8, 12}: both at 12 remove 8 units, the budget 0.3 * 32 = 9.6 needs one group at 8.
    assert allocate(groups, {"a": 0.01, "b": 1.0}, share, 0.3, 4) == {"a": 8, "b": 12}
    assert allocate(groups, {"a": 1.0, "b": 0.01}, share, 0.3, 4) == {"a": 12, "b": 8}


def test_allocate_reaches_the_budget_and_stops_there():
    groups = [_group("a", 16), _group("b", 32), _group("c", 64), _group("d", 8)]
    cost = {"a": 0.02, "b": 0.01, "c": 0.005, "d": 0.0}
    share = _linear_share(groups, cost)
    sens = {"a": 0.5, "b": 0.1, "c": 0.2, "d": 0.0}
    for ratio in (0.2, 0.3, 0.5):
        choice = allocate(groups, sens, share, ratio, 8)
        kept = share({g.name: choice[g.name] / g.units for g in groups})
        assert kept <= 1 - ratio + 1e-12
        for g in groups:
            assert choice[g.name] in candidates(g.units, 1, ratio, 8)
            # undoing any one cut would miss the budget: nothing is pruned beyond what the ratio asks
            if choice[g.name] < max(candidates(g.units, 1, ratio, 8)) and cost[g.name] > 0:
                undone = {**choice, g.name: max(candidates(g.units, 1, ratio, 8))}
                assert share({n: undone[n] / u.units for n, u in zip(undone, groups)}) > 1 - ratio


def test_allocate_16_channels_ratio_03():
    assert candidates(16, 1, 0.3, 8) == [8, 16]
    groups = [_group("a", 16)]
    assert allocate(groups, {"a": 0.3}, _linear_share(groups, {"a": 1.0}), 0.3, 8) == {"a": 8}


def test_cost_model_is_exact_for_a_pruned_resnet(tiny_resnet, resnet_example, resnet_calib):
    """The allocation's cost model predicts the parameters and MACs of the really pruned model (no double count of
    weights whose input and output channels are both removed)."""
    from hpqdeploy.core.prune import CostModel, _layer_macs
    from hpqdeploy.metrics import count_macs

    graph = build_graph(tiny_resnet, resnet_example)
    groups = find_groups(tiny_resnet, graph)
    cost = CostModel(tiny_resnet, graph, groups, resnet_example)
    decisions = plan_pruning(tiny_resnet, resnet_example, resnet_calib, 0.4, 8, "taylor")
    params0 = sum(p.numel() for p in tiny_resnet.parameters())
    macs0 = sum(_layer_macs(tiny_resnet, resnet_example).values())
    predicted = cost.kept_share({d.name: d.kept / d.units for d in decisions})
    pruned = apply_pruning(copy.deepcopy(tiny_resnet), resnet_example, decisions)
    params1 = sum(p.numel() for p in pruned.parameters())
    macs1 = sum(_layer_macs(pruned, resnet_example).values())
    assert predicted == pytest.approx(0.5 * (params1 / params0 + macs1 / macs0), rel=1e-9)
    assert predicted < 0.9
    assert macs1 / macs0 == pytest.approx(count_macs(pruned, resnet_example) / count_macs(tiny_resnet, resnet_example),
                                          abs=0.02)


def test_allocation_prunes_no_further_than_the_ratio(tiny_resnet, resnet_example, resnet_calib):
    """Uniform pruning by the ratio is the budget: the allocation meets it within one rounding step."""
    from hpqdeploy.core.prune import CostModel

    graph = build_graph(tiny_resnet, resnet_example)
    groups = {g.name: g for g in find_groups(tiny_resnet, graph)}
    cost = CostModel(tiny_resnet, graph, list(groups.values()), resnet_example)
    decisions = plan_pruning(tiny_resnet, resnet_example, resnet_calib, 0.3, 8, "taylor")
    kept = {d.name: d.kept for d in decisions}
    target = cost.kept_share({n: 0.7 for n in groups})
    assert cost.kept_share({n: k / groups[n].units for n, k in kept.items()}) <= target + 1e-12
    for d in decisions:
        high = max(candidates(d.units, d.unit_channels, 0.3, 8))
        if d.kept < high:  # every cut is needed: undoing it misses the budget
            undone = {**kept, d.name: high}
            assert cost.kept_share({n: k / groups[n].units for n, k in undone.items()}) > target


def test_decisions_replay_from_json(tiny_resnet, resnet_example, resnet_calib):
    fresh = copy.deepcopy(tiny_resnet)
    decisions = plan_pruning(tiny_resnet, resnet_example, resnet_calib, 0.4, 8, "taylor")
    apply_pruning(tiny_resnet, resnet_example, decisions)
    blob = json.loads(json.dumps([d.to_json() for d in decisions]))
    replayed = [GroupDecision.from_json(d) for d in blob]
    assert replayed == decisions
    apply_pruning(fresh, resnet_example, replayed)
    assert _shapes(fresh) == _shapes(tiny_resnet)
    fresh.load_state_dict(tiny_resnet.state_dict(), strict=True)
    x = torch.randn(3, 3, 16, 16)
    assert torch.equal(fresh(x), tiny_resnet(x))


def test_plan_naming_a_missing_group_is_rejected(tiny_resnet, resnet_example):
    with pytest.raises(ValueError, match="layer9"):
        apply_pruning(tiny_resnet, resnet_example, [GroupDecision("layer9.conv", "channels", 16, 8,
                                                                  removed=list(range(8)))])


# ---------------------------------------------------------------- transformers: heads and FFN neurons


def _bert_layers(model):
    return model.hf.bert.encoder.layer


def test_bert_heads_and_ffn_pruned(tiny_bert, bert_example, bert_calib):
    decisions = plan_pruning(tiny_bert, bert_example, bert_calib, 0.5, 8, "taylor")
    by_kind = {}
    for d in decisions:
        by_kind.setdefault(d.kind, []).append(d)
    assert [d.units for d in by_kind["heads"]] == [4, 4] and [d.kept for d in by_kind["heads"]] == [2, 2]
    assert [d.units for d in by_kind["ffn"]] == [128, 128] and [d.kept for d in by_kind["ffn"]] == [64, 64]
    assert all(d.unit_channels == 16 for d in by_kind["heads"])
    apply_pruning(tiny_bert, bert_example, decisions)
    for layer in _bert_layers(tiny_bert):
        attn = layer.attention.self
        assert attn.num_attention_heads == 2 and attn.all_head_size == 32
        for lin in (attn.query, attn.key, attn.value):
            assert lin.out_features == 32 and lin.in_features == 64
        assert layer.attention.output.dense.in_features == 32
        assert layer.attention.output.dense.out_features == 64  # the hidden size is kept
        assert layer.intermediate.dense.out_features == 64
        assert layer.output.dense.in_features == 64
    logits = tiny_bert(**bert_example)
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()


def _hidden(model, inputs):
    """The encoder's output (layer-normed, order 1): a sharper witness than the near-zero logits of a random BERT."""
    with torch.no_grad():
        return model.hf.bert(**inputs).last_hidden_state


def test_bert_silent_heads_and_neurons_keep_the_function(tiny_bert, bert_example):
    layer = _bert_layers(tiny_bert)[0]
    heads, neurons = [1, 3], list(range(0, 128, 3))
    with torch.no_grad():
        for h in heads:  # a head whose values are zero adds nothing to the attention output
            layer.attention.self.value.weight[16 * h : 16 * (h + 1)] = 0
            layer.attention.self.value.bias[16 * h : 16 * (h + 1)] = 0
        layer.intermediate.dense.weight[neurons] = 0  # GELU(0) = 0
        layer.intermediate.dense.bias[neurons] = 0
    expected = _hidden(tiny_bert, bert_example)
    decisions = [
        GroupDecision("hf.bert.encoder.layer.0.attention.self", "heads", 4, 2, 16, removed=heads),
        GroupDecision("hf.bert.encoder.layer.0.intermediate.dense", "ffn", 128, 128 - len(neurons), removed=neurons),
    ]
    apply_pruning(tiny_bert, bert_example, decisions)
    assert layer.attention.self.value.out_features == 32
    assert layer.intermediate.dense.out_features == 128 - len(neurons)
    assert torch.allclose(_hidden(tiny_bert, bert_example), expected, atol=1e-5)
    # The heads kept are the right ones: pruning two live heads instead changes the outputs.
    other = _bert_layers(tiny_bert)[1]
    apply_pruning(tiny_bert, bert_example, [GroupDecision("hf.bert.encoder.layer.1.attention.self", "heads", 4, 2,
                                                          16, removed=[0, 2])])
    assert other.attention.self.num_attention_heads == 2
    assert (_hidden(tiny_bert, bert_example) - expected).abs().max() > 0.01


def test_bert_decisions_replay_from_json(tiny_bert, bert_example, bert_calib, bert_factory):
    decisions = plan_pruning(tiny_bert, bert_example, bert_calib, 0.3, 8, "magnitude")
    apply_pruning(tiny_bert, bert_example, decisions)
    fresh = bert_factory(seed=1)
    apply_pruning(fresh, bert_example, [GroupDecision.from_json(json.loads(json.dumps(d.to_json())))
                                        for d in decisions])
    assert _shapes(fresh) == _shapes(tiny_bert)
    fresh.load_state_dict(tiny_bert.state_dict())
    assert torch.equal(fresh(**bert_example), tiny_bert(**bert_example))


def test_distilbert_heads_pruned(bert_example, bert_calib):
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    from hpqdeploy.models.hf_text import TextClassifier

    torch.manual_seed(0)
    cfg = DistilBertConfig(vocab_size=100, dim=64, n_heads=4, hidden_dim=128, n_layers=2, num_labels=2)
    model = TextClassifier(DistilBertForSequenceClassification(cfg)).eval()
    decisions = plan_pruning(model, bert_example, bert_calib, 0.5, 8, "magnitude")
    assert sorted(d.kind for d in decisions) == ["ffn", "ffn", "heads", "heads"]
    apply_pruning(model, bert_example, decisions)
    for block in model.hf.distilbert.transformer.layer:
        assert block.attention.n_heads == 2 and block.attention.q_lin.out_features == 32
        assert block.attention.out_lin.in_features == 32 and block.ffn.lin1.out_features == 64
    assert model(**bert_example).shape == (2, 2)


def _faded_and_pruned(model, example, decisions, factor):
    faded, pruned = copy.deepcopy(model), apply_pruning(copy.deepcopy(model), example, decisions)
    gates = FadeOut(faded, example, decisions)
    with torch.no_grad(), gates.attached():
        gates.factor = factor
        out = forward(faded, example)
    return faded, out, forward(pruned, example)


def test_fade_out_at_zero_is_the_pruned_model(tiny_resnet, resnet_example, resnet_calib):
    decisions = plan_pruning(tiny_resnet, resnet_example, resnet_calib, 0.3, 8, "taylor")
    assert any(d.removed for d in decisions)
    faded, out, pruned_out = _faded_and_pruned(tiny_resnet, resnet_example, decisions, 0.0)
    torch.testing.assert_close(out, pruned_out, rtol=1e-4, atol=1e-5)
    # the hooks are gone after the block: the faded model is the baseline again
    torch.testing.assert_close(forward(faded, resnet_example), forward(tiny_resnet, resnet_example))


def test_fade_out_half_way_is_neither(tiny_resnet, resnet_example, resnet_calib):
    decisions = plan_pruning(tiny_resnet, resnet_example, resnet_calib, 0.3, 8, "taylor")
    _, out, pruned_out = _faded_and_pruned(tiny_resnet, resnet_example, decisions, 0.5)
    with torch.no_grad():
        full = forward(tiny_resnet, resnet_example)
    assert not torch.allclose(out, pruned_out, atol=1e-3) and not torch.allclose(out, full, atol=1e-3)


def test_bert_fade_out_at_zero_is_the_pruned_model(tiny_bert, bert_example, bert_calib):
    decisions = plan_pruning(tiny_bert, bert_example, bert_calib, 0.5, 1, "taylor")
    assert {d.kind for d in decisions if d.removed} == {"heads", "ffn"}
    _, out, pruned_out = _faded_and_pruned(tiny_bert, bert_example, decisions, 0.0)
    torch.testing.assert_close(out, pruned_out, rtol=1e-4, atol=1e-5)


def test_fade_schedule_falls_from_one_to_zero(tiny_resnet, resnet_example):
    gates = FadeOut(tiny_resnet, resnet_example, [])
    factors = []
    for step in range(10):
        gates.schedule(step, 10)
        factors.append(gates.factor)
    assert factors[0] > 0.95 and factors[-1] == 0.0
    assert all(a > b for a, b in zip(factors, factors[1:]))


def test_a_group_the_widths_cannot_shrink_is_left_out_of_the_budget():
    """At a multiple of 8 an 8-channel group keeps all its channels; the others are pruned by the ratio, not by the
    ratio plus the share the unprunable group could not give (which would cut both 64-channel groups to 40)."""
    groups = [_group("a", 8), _group("b", 64), _group("c", 64)]
    share = _linear_share(groups, {"a": 4.0, "b": 0.25, "c": 0.25})
    assert candidates(8, 1, 0.3, 8) == [8]
    choice = allocate(groups, {"a": 1.0, "b": 1.0, "c": 0.01}, share, 0.3, 8)
    assert choice == {"a": 8, "b": 48, "c": 40}  # only the less sensitive group goes below 64 * 0.7
    assert share({"a": 1.0, "b": 48 / 64, "c": 40 / 64}) <= 0.5 + 0.5 * 0.7
