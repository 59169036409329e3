"""A torchvision model, compressed with hpqdeploy's Python API and fine-tuned in a plain PyTorch loop.

    python examples/torchvision_plain_loop.py --out runs/example-resnet18

1. train a torchvision ResNet-18 on CIFAR-10 for a few epochs (the baseline: your own model and loop);
2. plan: importance, sensitivity, the pruning and bit allocation, as plain data (written to plan.json);
3. apply the plan: a pruned, fake-quantized, still trainable nn.Module;
4. fine-tune it in the same loop, with distillation from the baseline written out in five lines;
5. save the directory `hpqdeploy export` reads, and export it to ONNX Runtime, evaluated inside the runtime.

Sizes default to a short run; `--train-limit`, `--epochs` scale it.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader

import hpqdeploy as hq

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg"  # the copy beside the project


def train(model, batches, epochs: int, lr: float, teacher=None, temperature: float = 4.0, alpha: float = 0.9):
    """The user's own loop: SGD with a cosine schedule; with a teacher, Hinton distillation."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs * len(batches)))
    for _ in range(epochs):
        model.train()
        for images, labels in batches:
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
            if teacher is not None:
                with torch.no_grad():
                    soft = F.softmax(teacher(images) / temperature, dim=-1)
                kd = F.kl_div(F.log_softmax(logits / temperature, dim=-1), soft, reduction="batchmean")
                loss = (1 - alpha) * loss + alpha * kd * temperature**2
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/example-resnet18"))
    ap.add_argument("--data-dir", default=str(SHARED) if SHARED.is_dir() else None,
                    help="CIFAR-10 archives or an ImageFolder tree (default: the shared copy, else the hub)")
    ap.add_argument("--train-limit", type=int, default=2000)
    ap.add_argument("--eval-limit", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--runtime", default="onnxruntime")
    args = ap.parse_args()
    torch.manual_seed(0)

    data = hq.DataOptions(name="cifar10", data_dir=args.data_dir, calib_size=128, train_limit=args.train_limit,
                          eval_limit=args.eval_limit)
    splits = hq.load_data(data)
    train_batches = DataLoader(splits.train, batch_size=64, shuffle=True)
    eval_batches = DataLoader(splits.eval, batch_size=128)
    calibration = list(DataLoader(splits.calib, batch_size=64))[:2]

    model = torchvision.models.resnet18(num_classes=10)
    train(model, train_batches, args.epochs, lr=0.05)
    baseline = copy.deepcopy(model).eval()
    print("baseline accuracy", round(hq.evaluate(baseline, eval_batches)["accuracy"], 4))

    example = torch.randn(1, 3, 32, 32)
    plan = hq.plan(model, example, calibration, hq.CompressOptions(method="hybrid", prune_ratio=0.3,
                                                                   target=args.runtime))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print("pruned groups", sum(1 for g in plan["pruning"] if g["removed"]), "of", len(plan["pruning"]),
          "| 4-bit layers", sum(1 for b in plan["bits"].values() if any(r["bits"] == 4 for r in b["bits"])))
    json.dumps(plan)  # the plan is plain data: save it, edit it, apply it later

    model = hq.apply(model, plan, calibration)
    train(model, train_batches, args.epochs, lr=0.01, teacher=baseline)
    saved = hq.save(model, plan, args.out, source="resnet18", num_classes=10, input_shape=(3, 32, 32), data=data,
                    evaluation=eval_batches)
    metrics = hq.load(saved).metrics
    print("compressed accuracy", round(metrics["accuracy"], 4), "| params", metrics["params"],
          "| MACs", metrics["macs"])
    report = hq.export(saved, args.out.with_name(args.out.name + f"-{args.runtime}"),
                       hq.ExportOptions(target=args.runtime, eval_limit=args.eval_limit))
    print(f"{args.runtime}: accuracy {report['accuracy']:.4f} (PyTorch {report['accuracy_pytorch']:.4f}), "
          f"{report['bytes_on_disk']} bytes")


if __name__ == "__main__":
    main()
