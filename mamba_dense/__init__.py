"""mamba-dense: vision-Mamba encoders for dense prediction on one shared Triton scan operator."""

__version__ = "0.1.0"
