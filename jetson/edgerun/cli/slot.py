"""``edgerun slot``: the releases deployed under a root folder: list them, activate one, roll back."""

from edgerun.bench import to_json


def cmd_slot(args):
    from edgerun.bundle import slots

    if args.action == "list":
        result = slots.listing(args.root)
    elif args.action == "activate":
        if not args.version:
            raise slots.SlotError("slot activate needs the release: edgerun slot activate NAME VERSION --root DIR")
        result = slots.activate(args.root, args.name, args.version)
    else:
        result = slots.rollback(args.root, args.name)
    print(to_json(result))
    return 0


def add_parser(sub):
    p = sub.add_parser("slot", help="deployed releases under a root folder: list, activate one, roll back")
    p.add_argument("action", choices=["list", "activate", "rollback"])
    p.add_argument("name", nargs="?", help="model name (the manifest's name)")
    p.add_argument("version", nargs="?", help="activate: the release (16 hex digits of its manifest sha256)")
    p.add_argument("--root", default="edgedistill", help="the deploy root (default: ~/edgedistill over ssh)")
    p.set_defaults(handler=cmd_slot)
