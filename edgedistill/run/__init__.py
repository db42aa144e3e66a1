"""Runs: the run folder, what its stages share, one module per stage family, the sweep."""
