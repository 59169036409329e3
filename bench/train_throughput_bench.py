"""How fast hpqdeploy fine-tunes on this machine, per compute setting, and whether the fastest keeps the accuracy.

Throughput: hpqdeploy's own training loop (`training.loop.finetune`: Adam, fake quantization where the model has it,
the data loader, augmentation) over `--images` CIFAR-10 training images with ResNet-20, and over `--text` SST-2
sentences with MiniLM (64 tokens), after one warm-up pass. Each setting runs in a process of its own (two under
torchrun for data-parallel ones), and the whole list is repeated `--repeats` times in turn; the table gives the
median images per second.

- `today`: one process, fp32, no loader workers, default memory format (the loop before these settings);
- `workers`: one data-loader worker process;
- `channels-last`, `bf16` (autocast; the quantizers stay fp32), `bf16+channels-last`;
- `ddp-2`, `ddp-2+bf16`: two processes under torchrun (gloo), one thread each, global batch 2 x 64.

Accuracy: the fastest setting and fp32 each compress the same ResNet-20 baseline (the shared pretrained weights,
evaluated on the shared JPEG test set) as hybrid for `--epochs` epochs with the same seed (on the first
`--finetune-limit` training images when given); the goal is the fastest within 0.4 points of fp32. Writes
bench/results/train_throughput.json and its section of BENCHMARKS.md. Usage:

    .venv/bin/python bench/train_throughput_bench.py --runs /tmp/tp [--images 4096] [--repeats 3] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, machine_markdown, publish, results_dir  # noqa: E402

RESULTS = results_dir() / "train_throughput.json"
HEADING = "Training throughput per compute setting (CPU)"
SHARED = ROOT.parent / "shared"
CIFAR = SHARED / "data" / "cifar10-jpeg"
SST2 = SHARED / "data" / "sst2"
WEIGHTS = SHARED / "models" / "cifar10-resnet" / "resnet20-12fca82f.th"
# setting -> (ranks, precision, workers, channels_last)
IMAGE_SETTINGS = {"today": (1, "fp32", 0, False), "workers": (1, "fp32", 1, False),
                  "channels-last": (1, "fp32", 0, True), "bf16": (1, "bf16", 0, False),
                  "bf16+channels-last": (1, "bf16", 0, True), "ddp-2": (2, "fp32", 0, False),
                  "ddp-2+bf16": (2, "bf16", 0, False)}
TEXT_SETTINGS = {"today": (1, "fp32", 0, False), "bf16": (1, "bf16", 0, False)}
GOAL_SPEEDUP, GOAL_POINTS = 2.0, 0.4


def worker(args) -> None:
    """One measurement (this process is one rank under torchrun for the data-parallel settings)."""
    import torch

    from hpqdeploy.config import ComputeOptions, DataOptions, TrainConfig
    from hpqdeploy.data import load_data
    from hpqdeploy.models import load_model
    from hpqdeploy.training.compute import Compute
    from hpqdeploy.training.loop import finetune, loader

    _, precision, workers, channels_last = (IMAGE_SETTINGS if args.model == "resnet20" else TEXT_SETTINGS)[args.worker]
    compute = Compute(ComputeOptions(device="cpu", precision=precision, workers=workers, channels_last=channels_last))
    text = args.model == "minilm"
    data = DataOptions(name="sst2" if text else "cifar10", data_dir=str(SST2 if text else CIFAR), calib_size=64,
                       train_limit=args.images)
    splits = load_data(data.name, data.request(0))
    torch.manual_seed(0)
    model = load_model(args.model, num_classes=splits.info.num_classes, input_shape=splits.info.input_shape,
                       pretrained=False, max_length=64)
    compute.place(model.module)
    batch = 32 if text else 64
    cfg = TrainConfig(epochs=1, batch_size=batch, distill=0.0)
    warm = torch.utils.data.Subset(splits.train, range(min(len(splits.train), 4 * batch * compute.ranks.world)))
    finetune(model.module, loader(warm, model.collate, batch, True, compute=compute), cfg, quiet=True,
             compute=compute)
    train = loader(splits.train, model.collate, batch, True, compute=compute)
    start = time.perf_counter()
    finetune(model.module, train, cfg, quiet=True, compute=compute)
    seconds = time.perf_counter() - start
    if compute.ranks.main:
        Path(args.out).write_text(json.dumps({"images": len(splits.train), "seconds": seconds,
                                              "images_per_s": len(splits.train) / seconds}))


def measure(model: str, setting: str, images: int, out: Path) -> float:
    ranks = (IMAGE_SETTINGS if model == "resnet20" else TEXT_SETTINGS)[setting][0]
    me = [str(Path(__file__).resolve()), "--worker", setting, "--model", model, "--images", str(images),
          "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), *me]
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // ranks))
    else:
        cmd = [sys.executable, *me]
        env.pop("OMP_NUM_THREADS", None)
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return json.loads(out.read_text())["images_per_s"]


def throughput(model: str, settings: dict, images: int, repeats: int, runs: Path) -> dict:
    per = {s: [] for s in settings}
    for r in range(repeats):
        for s in settings:
            per[s].append(measure(model, s, images, runs / f"{model}-{s}-{r}.json"))
            print(f"{model} {s}: {per[s][-1]:.0f} images/s", flush=True)
    today = statistics.median(per["today"])
    return {s: {"images_per_s": statistics.median(v), "per_repeat": v,
                "speedup": statistics.median(v) / today} for s, v in per.items()}


def cli(runs: Path, *args: str, ranks: int = 1, env: dict | None = None) -> dict:
    base = [sys.executable, "-m", "hpqdeploy", *args, "--json", "--quiet"]
    if ranks > 1:
        base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
                "-m", "hpqdeploy", *args, "--json", "--quiet"]
    result = subprocess.run(base, cwd=runs, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if result.returncode:
        raise SystemExit(f"failed: {' '.join(base)}\n{result.stderr[-2000:]}")
    return json.loads(result.stdout)


def accuracy(runs: Path, fastest: str, epochs: int, limit: int | None = None) -> dict:
    """The hybrid at fp32 and with the fastest setting, same baseline and seed."""
    if not (runs / "baseline").exists():
        cli(runs, "train", "resnet20", "--weights", str(WEIGHTS), "--data", "cifar10", "--data-dir", str(CIFAR),
            "--epochs", "0", "-o", "baseline")
    out = {}
    for name in ("today", fastest):
        ranks, precision, workers, channels_last = IMAGE_SETTINGS[name]
        args = ["compress", "baseline", "-o", f"hybrid-{name}", "--epochs", str(epochs), "--precision", precision,
                "--workers", str(workers), "--device", "cpu", *(["--channels-last"] if channels_last else []),
                *(["--train-limit", str(limit)] if limit else [])]
        env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // ranks))} if ranks > 1 else None
        start = time.time()
        m = json.loads((runs / f"hybrid-{name}" / "metrics.json").read_text()) \
            if (runs / f"hybrid-{name}").exists() else cli(runs, *args, ranks=ranks, env=env)
        out[name] = {"accuracy": m["accuracy"], "finetune_seconds": m.get("finetune_seconds"),
                     "wall_seconds": round(time.time() - start, 1), "world_size": m.get("world_size", 1),
                     "global_batch": m.get("global_batch"), "command": "hpqdeploy " + " ".join(args)}
    out["points_below_fp32"] = round(100 * (out["today"]["accuracy"] - out[fastest]["accuracy"]), 2)
    return out


def markdown(blob: dict) -> str:
    lines = [machine_markdown(blob["machine"]), "",
             f"Command: `{blob['command']}` ({blob['seconds']:.0f} s). ResNet-20 on {blob['images']} CIFAR-10 "
             f"training images, MiniLM on {blob['text']} SST-2 sentences, median of {blob['repeats']} repeats.", "",
             "| model | setting | images/s | repeats (images/s) | x today |", "| --- | --- | ---: | --- | ---: |"]
    for model, table in (("ResNet-20", blob["resnet20"]), ("MiniLM", blob["minilm"])):
        for s, r in table.items():
            runs = ", ".join(f"{v:.0f}" for v in r["per_repeat"])
            lines.append(f"| {model} | {s} | {r['images_per_s']:.0f} | {runs} | {r['speedup']:.2f} |")
    acc, fastest = blob["accuracy"], blob["fastest"]
    speed = blob["resnet20"][fastest]["speedup"]
    met = speed >= GOAL_SPEEDUP and acc["points_below_fp32"] <= GOAL_POINTS
    on = f" on {blob['finetune_limit']:,} training images" if blob.get("finetune_limit") else ""
    lines += ["", f"Hybrid, {blob['epochs']} epochs{on}, same baseline and seed: fp32 "
              f"{100 * acc['today']['accuracy']:.2f}%, {fastest} {100 * acc[fastest]['accuracy']:.2f}% ({acc['points_below_fp32']:.2f} points below fp32; "
              f"fine-tuning {acc['today']['finetune_seconds']:.0f} s and {acc[fastest]['finetune_seconds']:.0f} s).",
              "", f"Goal: the fastest setting at least {GOAL_SPEEDUP:.0f}x today's loop, within {GOAL_POINTS} points "
              f"of fp32: {'met' if met else 'not met'} ({fastest}: {speed:.2f}x)."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=Path("/tmp/train-throughput"))
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--text", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--finetune-limit", type=int, help="fine-tune the accuracy check on this many training images")
    ap.add_argument("--render-only", action="store_true", help="rewrite the section from the results JSON")
    ap.add_argument("--worker"), ap.add_argument("--model", default="resnet20"), ap.add_argument("--out")
    ap.add_argument("--parse-only", action="store_true", help=argparse.SUPPRESS)  # run_all's tests
    args = ap.parse_args()
    if args.parse_only:
        return
    if args.worker:
        return worker(args)
    if args.render_only:
        blob = json.loads(RESULTS.read_text())
        return publish(RESULTS, blob, "train_throughput", HEADING, markdown(blob))
    args.runs.mkdir(parents=True, exist_ok=True)
    start = time.time()
    blob = {"machine": machine(), "command": "python bench/train_throughput_bench.py " + " ".join(sys.argv[1:]),
            "images": args.images, "text": args.text, "repeats": args.repeats, "epochs": args.epochs,
            "finetune_limit": args.finetune_limit}
    blob["resnet20"] = throughput("resnet20", IMAGE_SETTINGS, args.images, args.repeats, args.runs)
    blob["minilm"] = throughput("minilm", TEXT_SETTINGS, args.text, args.repeats, args.runs)
    blob["fastest"] = max(blob["resnet20"], key=lambda s: blob["resnet20"][s]["images_per_s"])
    blob["accuracy"] = accuracy(args.runs, blob["fastest"], args.epochs, args.finetune_limit)
    blob["seconds"] = time.time() - start
    publish(RESULTS, blob, "train_throughput", HEADING, markdown(blob))


if __name__ == "__main__":
    main()
