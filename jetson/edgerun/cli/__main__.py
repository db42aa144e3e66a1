"""``python -m edgerun.cli``: the command line (the systemd unit of `edgerun service` runs it so)."""

import sys

from edgerun.cli import main

sys.exit(main())
