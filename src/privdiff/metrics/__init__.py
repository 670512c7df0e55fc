"""Offline utility and statistics: feature distances, held-out loss, labels, identity, condition
fidelity and bootstrap intervals. Pure measurement; nothing here trains a model."""
