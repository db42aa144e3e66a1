"""``edgerun verify``: a bundle's files, signature and pins (and an engine's sealed record) checked without running
it."""

from edgerun.cli.common import add_trust_args, open_from_args
from edgerun.errors import EngineMismatchError
from edgerun.runtime.engine_record import device_key_path


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
    if args.engine:
        from edgerun.runtime.trt import check_engine

        try:
            with open(args.engine, "rb") as fh:
                engine_bytes = fh.read()
        except (OSError, IOError) as exc:
            raise EngineMismatchError("--engine %s cannot be read (%s)" % (args.engine, exc)) from exc
        meta = check_engine(args.engine, bundle, engine_bytes=engine_bytes)
        print(
            "engine: %s matches its record (TensorRT %s, %s, built on %s) sealed by this device's key (%s), for "
            "this bundle"
            % (args.engine, meta.get("tensorrt"), meta.get("precision"), meta.get("board") or "?", device_key_path())
        )
    return 0


def add_parser(sub):
    p = sub.add_parser("verify", help="check a bundle's files, signature and pins without running it")
    p.add_argument("bundle", help="bundle folder or .edb file")
    p.add_argument(
        "--engine",
        help="also check this engine: its bytes match its record, sealed by this device's key, built from this "
        "bundle (no TensorRT needed)",
    )
    add_trust_args(p)
    p.set_defaults(handler=cmd_verify)
