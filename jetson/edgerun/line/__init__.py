"""The line: camera sources, the classification loop, drift, soak, the systemd service."""
