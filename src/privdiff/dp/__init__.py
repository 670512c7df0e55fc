"""Differential privacy for LoRA fine-tuning: accounting, per-example gradients, Poisson batches."""
