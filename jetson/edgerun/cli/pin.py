"""``edgerun pin``: approve a bundle in the pins file (its exact manifest, or its date as the floor)."""

import json

from edgerun.cli.common import add_trust_args, open_from_args


def cmd_pin(args):
    from edgerun.bundle.pins import DEFAULT_PINS_FILE, add_pin, resolve_pins

    path = resolve_pins(args.pins) or DEFAULT_PINS_FILE
    bundle = open_from_args(args, pinned=False)  # verified (and held to the trust set) before it is approved
    data = add_pin(path, bundle.manifest, bundle.manifest_sha256, args.rule)
    print(
        "%s: model '%s' now pinned with %s"
        % (path, bundle.manifest.data["name"], json.dumps(data["pins"][bundle.manifest.data["name"]]))
    )
    return 0


def add_parser(sub):
    p = sub.add_parser("pin", help="approve a bundle in the pins file: its exact manifest, or its date as the floor")
    p.add_argument("bundle", help="bundle folder or .edb file")
    p.add_argument(
        "--rule",
        choices=["allow", "not_before"],
        default="allow",
        help="allow: add this manifest's sha256 to its model's allow list (default); not_before: refuse "
        "releases of this model created before this one (needs a trust set)",
    )
    add_trust_args(p)
    p.set_defaults(handler=cmd_pin)
