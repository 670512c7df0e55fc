"""privdiff: private fine-tuning of diffusion models, and the attacks that measure what leaks."""

import os

# privdiff never downloads anything; make the Hugging Face libraries fail fast instead of trying,
# and keep their import-time chatter (e.g. optional torchvision notices) off the terminal.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

__version__ = "0.1.0"

__all__ = ["__version__"]
