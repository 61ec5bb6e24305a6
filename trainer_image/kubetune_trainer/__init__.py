"""kubetune's trainer: what runs under torchrun in every PyTorchJob pod (and under `kubetune local`)."""

__version__ = "0.1.0"
