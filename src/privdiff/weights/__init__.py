"""Weights-to-image attack on shared LoRA files (specs/weights-attack.md), and its defences."""
