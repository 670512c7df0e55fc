"""Weights-to-image attack on shared LoRA files (docs/design/weights-attack.md), and its defences."""
