"""``edgedistill keygen``: an Ed25519 key pair for signing bundles (KEY, mode 0600, and KEY.pub)."""

from __future__ import annotations

import argparse
import os

from edgedistill.errors import EdgedistillError


def add_parser(sub) -> None:
    p = sub.add_parser("keygen", help="make an Ed25519 key pair for signing bundles (KEY and KEY.pub)")
    p.add_argument("-o", "--output", required=True, help="private key file; the public key goes to OUTPUT.pub")
    p.add_argument(
        "--passphrase-env",
        metavar="VAR",
        help="encrypt the private key with the passphrase in this environment variable",
    )
    p.add_argument("--force", action="store_true", help="replace an existing key pair")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from edgerun.bundle.signing import generate_keypair

    passphrase = None
    if args.passphrase_env:
        passphrase = os.environ.get(args.passphrase_env)
        if not passphrase:
            raise EdgedistillError(
                f"--passphrase-env {args.passphrase_env}: that environment variable is "
                "empty or unset; export the passphrase in it first"
            )
    private, public, kid = generate_keypair(args.output, passphrase=passphrase, force=args.force)
    print(
        f"private key {private} (mode 0600: keep it off the devices), public key {public}, key id {kid}\n"
        f"sign: edgedistill pack BUNDLE -o X.edb --sign {private}\n"
        f"device: copy {public} into /etc/edgerun/trusted-keys/ or pass --trust {public}"
    )
    return 0
