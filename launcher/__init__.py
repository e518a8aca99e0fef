"""ddplaunch: a launcher for PyTorch distributed training with torchrun's environment."""

__version__ = "0.1.0"
