"""Training: the fine-tuning loop with distillation, checkpoints and exact resume."""
