import pytest
import torch
import torch.nn as nn

from hpqdeploy.hooks import evaluating, forward, forward_hooks


def test_forward_takes_a_tensor_or_keyword_tensors():
    class Keywords(nn.Module):
        def forward(self, input_ids, attention_mask):
            return input_ids * attention_mask

    x = torch.arange(4.0)
    assert torch.equal(forward(nn.Identity(), x), x)
    assert torch.equal(forward(Keywords(), {"input_ids": x, "attention_mask": torch.ones(4)}), x)


def test_forward_hooks_see_every_call_and_can_replace_the_output():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    seen = []
    x = torch.randn(5, 3)
    with forward_hooks([model[0], model[2]], lambda m, args, out: seen.append(m)):
        model(x)
        model(x)
    assert seen == [model[0], model[2], model[0], model[2]]

    with forward_hooks([model[2]], lambda m, args, out: torch.zeros_like(out)):
        assert torch.count_nonzero(model(x)) == 0
    assert torch.count_nonzero(model(x)) > 0


def test_forward_hooks_are_removed_when_the_block_fails():
    layer = nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="measurement failed"):
        with forward_hooks([layer], lambda m, args, out: out * 0):
            raise RuntimeError("measurement failed")
    assert not layer._forward_hooks
    assert torch.count_nonzero(layer(torch.ones(1, 2)) - layer.bias) > 0


def test_evaluating_restores_the_mode_also_after_a_failure():
    model = nn.Sequential(nn.BatchNorm1d(2), nn.Dropout(0.5)).train()
    with evaluating(model):
        assert not model.training and not model[0].training
    assert model.training and model[1].training
    model.eval()
    with evaluating(model):
        pass
    assert not model.training
    model.train()
    with pytest.raises(RuntimeError):
        with evaluating(model):
            raise RuntimeError("calibration failed")
    assert model.training
