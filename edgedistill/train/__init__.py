"""Training: the loop, its job and losses, feature matching, soft labels, torchrun, data-free."""
