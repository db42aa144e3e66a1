"""edgedistill: distill a large image classifier into a small one and carry it to an NVIDIA Jetson."""

__version__ = "0.1.0"
