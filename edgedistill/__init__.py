"""edgedistill: distill a large image classifier into a small one and carry it to an NVIDIA Jetson."""

import os

# albumentations asks PyPI for its latest version when imported; nothing here reaches the network at run time
# (factory machines are often offline, where the lookup waits for its timeout). A user may still set it to 0.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
