"""Shared fixtures: tiny models with calibration batches, and one cheap `digits` baseline artifact per session.

Everything here is small enough to run in a second or two on one thread.
"""

from pathlib import Path

import pytest
import torch

from hpqdeploy.models.cifar_resnet import CifarResNet

TESTS = Path(__file__).resolve().parent  # tests/ (its data/ and fakes/), whichever subdirectory a test is in
ROOT = TESTS.parent
SHARED = ROOT.parent / "shared"

RESNET_INPUT = (3, 16, 16)
RESNET_CLASSES = 4
BERT_VOCAB = 100
BERT_SEQ = 12


def _randomise_batchnorm(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial BN statistics and affine parameters, so pruning and quantization see realistic layers."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)


@pytest.fixture
def tiny_resnet() -> CifarResNet:
    """CIFAR ResNet-8 (one block per stage, 16/32/64 channels), 4 classes, eval mode."""
    torch.manual_seed(0)
    model = CifarResNet(8, num_classes=RESNET_CLASSES)
    _randomise_batchnorm(model, seed=1)
    return model.eval()


@pytest.fixture
def resnet_example() -> torch.Tensor:
    return torch.randn(1, *RESNET_INPUT, generator=torch.Generator().manual_seed(2))


@pytest.fixture
def resnet_calib() -> list:
    gen = torch.Generator().manual_seed(3)
    return [(torch.randn(8, *RESNET_INPUT, generator=gen), torch.randint(0, RESNET_CLASSES, (8,), generator=gen))
            for _ in range(3)]


def bert_inputs(batch: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, BERT_VOCAB, (batch, BERT_SEQ), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, BERT_SEQ - 4:] = 0  # one padded row, so the attention mask matters
    return {"input_ids": ids, "attention_mask": mask}


def make_tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    from hpqdeploy.models.hf_text import TextClassifier

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=2,
                     vocab_size=BERT_VOCAB, num_labels=2)
    return TextClassifier(BertForSequenceClassification(cfg)).eval()


@pytest.fixture
def tiny_bert():
    """2-layer BERT, hidden 64, 4 heads of 16, FFN 128, wrapped as `logits = model(input_ids, attention_mask)`."""
    return make_tiny_bert()


@pytest.fixture
def bert_factory():
    """`bert_factory(seed)`: another tiny BERT of the same architecture, with other weights."""
    return make_tiny_bert


@pytest.fixture
def bert_example() -> dict:
    return bert_inputs(2, seed=4)


@pytest.fixture
def bert_calib() -> list:
    gen = torch.Generator().manual_seed(5)
    return [(bert_inputs(4, seed=10 + i), torch.randint(0, 2, (4,), generator=gen)) for i in range(2)]


@pytest.fixture(scope="session")
def digits_baseline(tmp_path_factory) -> Path:
    """A real `train` artifact: ResNet-20 on scikit-learn's digits, one short epoch. Read-only for tests."""
    from hpqdeploy.config import TrainConfig
    from hpqdeploy.config import DataOptions
    from hpqdeploy.pipeline import run_train

    out = tmp_path_factory.mktemp("digits") / "baseline"
    run_train("resnet20", DataOptions("digits", calib_size=64, train_limit=256, eval_limit=100), out,
              TrainConfig(epochs=1, batch_size=64), quiet=True, command="pytest digits_baseline")
    return out


@pytest.fixture(scope="session")
def digits_hybrid(tmp_path_factory) -> Path:
    """A ResNet-8 baseline and hybrid on digits, trained past near-ties (agreement between a runtime and PyTorch is a
    coin flip on a barely trained model); shared by the lowering tests. Holds `baseline/` and `hybrid/`."""
    from hpqdeploy.config import TrainConfig
    from hpqdeploy.config import CompressOptions, DataOptions
    from hpqdeploy.pipeline import run_compress, run_train

    root = tmp_path_factory.mktemp("digits-hybrid")
    data = DataOptions("digits", calib_size=128, eval_limit=96)
    run_train("resnet8", data, root / "baseline", TrainConfig(epochs=5, batch_size=64), quiet=True)
    opts = CompressOptions(method="hybrid", train=TrainConfig(epochs=2, batch_size=64, distill=0.9), calib_batches=2)
    run_compress(root / "baseline", root / "hybrid", opts, quiet=True)
    return root


def record_window(meter, seconds: float, settle: float = 0.03):
    """Record `meter` around a window of `seconds`, with `settle` seconds of readings before and after it; returns
    (recorder, t0, t1). The meter must be open."""
    import time

    from hpqdeploy.device.meters.recorder import PowerRecorder

    with PowerRecorder(meter) as rec:
        time.sleep(settle)
        t0 = time.monotonic()
        time.sleep(seconds)
        t1 = time.monotonic()
        time.sleep(settle)
    return rec, t0, t1


def install_fake_executable(bindir: Path, name: str, script: Path) -> Path:
    """`script` (Python) as an executable `name` in `bindir`, run by this interpreter."""
    import sys

    bindir.mkdir(parents=True, exist_ok=True)
    exe = bindir / name
    exe.write_text(f"#!{sys.executable}\n" + script.read_text())
    exe.chmod(0o755)
    return exe


@pytest.fixture(scope="session")
def digits_quant(digits_baseline, tmp_path_factory) -> Path:
    """Quant-only compression of `digits_baseline`, no fine-tuning (calibration only). Read-only for tests."""
    from hpqdeploy.config import TrainConfig
    from hpqdeploy.config import CompressOptions
    from hpqdeploy.pipeline import run_compress

    out = tmp_path_factory.mktemp("digits-quant") / "quant"
    run_compress(digits_baseline, out, CompressOptions(method="quant", train=TrainConfig(epochs=0), calib_batches=1),
                 quiet=True)
    return out
