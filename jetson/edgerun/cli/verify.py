"""``edgerun verify``: a bundle's files, signature and pins checked without running it."""

from edgerun.cli.common import add_trust_args, open_from_args


def cmd_verify(args):
    from edgerun.bundle.manifest import SIGNATURE_FILE
    from edgerun.bundle.signing import read_signature

    bundle = open_from_args(args)
    record = read_signature(bundle.folder)
    print("%s: %d files match the manifest's sha256" % (args.bundle, len(bundle.manifest.data["files"])))
    if bundle.trust:
        print("signature: valid, by trusted key %s (%s)" % (bundle.signer, bundle.trust))
    elif record:
        print(
            "signature: %s present (key %s) but not checked: no trust set; pass --trust KEY.pub"
            % (SIGNATURE_FILE, record.get("key_id", "?"))
        )
    else:
        print("signature: none (unsigned bundle; no trust set configured)")
    print(
        "manifest sha256: %s (model '%s', created %s)"
        % (bundle.manifest_sha256, bundle.manifest.data["name"], bundle.manifest.data.get("created", "?"))
    )
    print("pins: %s" % (bundle.pinned_by or "none configured"))
    return 0


def add_parser(sub):
    p = sub.add_parser("verify", help="check a bundle's files, signature and pins without running it")
    p.add_argument("bundle", help="bundle folder or .edb file")
    add_trust_args(p)
    p.set_defaults(handler=cmd_verify)
