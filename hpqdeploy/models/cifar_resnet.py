"""The CIFAR ResNets of He et al. (2016), "option A" shortcuts, in a form dependency-aware pruning understands.

The checkpoints in `../shared/models/cifar10-resnet/` (akamaster/pytorch_resnet_cifar10) load into this definition.
The original shortcut is `F.pad(x[:, :, ::2, ::2], ...)`: it couples the channels of one stage's residual stream to
the next stage's, invisibly to a traced graph. Here it is an explicit `ChannelMapShortcut` module that records
which input channel feeds each output channel (or none: a zero-padded channel). `prune.py` registers a pruning
rule for it, so the residual streams of every stage can be pruned consistently.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ChannelMapShortcut(nn.Module):
    """out[:, j] = x[:, source[j], ::stride, ::stride], or 0 where source[j] == -1."""

    keeps_quantization_grid = True  # selects values and adds zeros: a quantized input stays on its grid

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        pad = (out_channels - in_channels) // 2
        source = torch.full((out_channels,), -1, dtype=torch.long)
        source[pad : pad + in_channels] = torch.arange(in_channels)
        self.stride = stride
        self.in_channels = in_channels  # kept in step by the pruning rule in `hpqdeploy.core.prune`
        self.register_buffer("source", source)

    @property
    def out_channels(self) -> int:
        return self.source.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        # One zero channel appended at the end stands for every padded output channel.
        x = F.pad(x, (0, 0, 0, 0, 0, 1))
        index = torch.where(self.source >= 0, self.source, x.shape[1] - 1)
        return x.index_select(1, index)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = ChannelMapShortcut(in_planes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError("depth must be 6n+2")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        planes_in = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(planes_in, planes, stride if i == 0 else 1))
                planes_in = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def load_akamaster_checkpoint(model: CifarResNet, path) -> None:
    """Load a `{'state_dict': {'module.<name>': ...}}` checkpoint of akamaster/pytorch_resnet_cifar10."""
    from hpqdeploy.models.spec import read_state_dict

    state = {k.removeprefix("module."): v for k, v in read_state_dict(path).items()}
    # The shortcut buffers are not in the checkpoint: keep the ones the constructor made.
    for name, buf in model.named_buffers():
        if name.endswith("shortcut.source"):
            state[name] = buf
    model.load_state_dict(state, strict=True)
