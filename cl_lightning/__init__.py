"""cl-lightning: continual learning with a memory agent on PyTorch Lightning."""

__version__ = "0.1.0"
