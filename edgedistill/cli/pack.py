"""``edgedistill pack``: a bundle folder packed into one .edb file for the device, signed with ``--sign``."""

from __future__ import annotations

import argparse
import os
import sys

from edgedistill.cli.console import setup_logging
from edgerun.bundle.signing import PASSPHRASE_ENV


def add_parser(sub) -> None:
    p = sub.add_parser("pack", help="pack a bundle folder into one .edb file for the device")
    p.add_argument("bundle", help="bundle folder (runs/<name>/bundle)")
    p.add_argument("-o", "--output", required=True, help="output file, e.g. student.edb")
    p.add_argument(
        "--sign",
        metavar="KEY",
        help="sign the manifest (which holds every file's sha256) with this "
        "private key from `edgedistill keygen`; passphrase from $"
        "EDGEDISTILL_KEY_PASSPHRASE if the key is encrypted",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from edgerun.bundle.bundle import pack_bundle

    setup_logging(None, args.verbose)
    path = pack_bundle(
        args.bundle, args.output, sign_key=args.sign, passphrase=os.environ.get(PASSPHRASE_ENV) if args.sign else None
    )
    if args.sign:
        from edgerun.bundle.signing import read_signature

        print(
            f"signed by key {read_signature(args.bundle)['key_id']} "
            f"(devices trust it with: edgerun ... --trust {args.sign}.pub)",
            file=sys.stderr,
        )
    print(path)
    return 0
