"""``edgerun service``: the line as a systemd service: install its unit, show its status."""

import os

from edgerun.bench import to_json
from edgerun.cli.common import PROBABILITY, add_trust_args, open_from_args
from edgerun.errors import EdgerunError


def cmd_service(args):
    from edgerun.line import service

    if args.action == "status":
        got = service.status(args.name, args.state_root)
        if args.json:
            print(to_json(got))
            return 0
        unit, st = got["unit"] or {}, got["status"]
        print(
            "edgerun-%s: %s"
            % (
                args.name,
                ("%s (%s), %s restart(s)" % (unit.get("ActiveState"), unit.get("SubState"), unit.get("NRestarts", "?")))
                if unit
                else "systemd state unknown (no systemctl here)",
            )
        )
        if not st:
            print("no status yet in %s (the camera writes it every 5 s once it runs)" % got["status_file"])
            return 0
        print(
            "%s: %.1f FPS over %d frames, %d dropped, %d reconnects, %d rejects, drift %s (updated %s)"
            % (
                st.get("source"),
                st.get("fps", 0),
                st.get("frames", 0),
                st.get("dropped", 0),
                st.get("reconnects", 0),
                st.get("rejects", 0),
                st.get("drift") or "off",
                st.get("updated"),
            )
        )
        for v in st.get("last_verdicts", [])[-5:]:
            print("  %s frame %d: %s" % (v["time"], v["frame"], v["text"]))
        if st.get("error"):
            print("  ended: %s" % st["error"])
        return 0
    return _install(args)


def _install(args):
    """Stage the release where the service's account owns it, check as that account that it opens and verifies
    with the unit's environment, then write the unit (``edgerun.line.release``)."""
    from edgerun.bundle.pins import resolve_pins
    from edgerun.bundle.signing import resolve_trust
    from edgerun.line import release, service

    if not args.bundle or not args.source:
        raise EdgerunError("service install needs BUNDLE and --source (the camera the line runs)")
    name = service.check_name(args.name)
    service.check_user(args.user, args.group)
    for flag in ("source", "reject_class"):
        if getattr(args, flag) is not None:
            service.check_unit_value("--" + flag.replace("_", "-"), getattr(args, flag))
    if args.watchdog < 5:
        raise EdgerunError(
            "--watchdog %d: at least 5 seconds (an engine's first inference can take seconds)" % args.watchdog
        )
    if not os.path.isdir(args.unit_dir):
        raise EdgerunError("--unit-dir %s does not exist" % args.unit_dir)
    service.plain_path(os.path.join(os.path.abspath(args.state_root), name))
    bundle = open_from_args(args)  # checked now (trust, pins, schema), by the installer
    staged = release.stage(
        release.ReleaseJob(
            name=name,
            state_root=args.state_root,
            bundle=os.path.abspath(args.bundle),
            engine=os.path.abspath(args.engine) if args.engine else None,
            trust=resolve_trust(args.trust),
            pins=resolve_pins(args.pins),
            user=args.user,
        )
    )
    # the same check, as the service's account with the unit's environment: what systemd will start can read it all
    release.check_as(args.user, release.verify_argv(args.python, staged), staged.environment)
    state = staged.state
    camera = [staged.bundle, "--source", args.source] + release.kept_frames(bundle.manifest.task, state)
    if staged.engine:
        camera += ["--engine", staged.engine]
    if args.reject_class:
        camera += ["--reject-class", args.reject_class]
    if args.threshold is not None:
        camera += ["--threshold", repr(args.threshold)]
    if args.soak:
        camera += ["--soak"]
    unit = service.ServiceUnit(
        name=name,
        camera_args=camera,
        user=args.user,
        group=args.group,
        watchdog_s=args.watchdog,
        python=args.python,
        state=state,
        environment=staged.environment,
    )
    path = service.install(unit, unit_dir=args.unit_dir, enable=not args.no_enable)
    print(
        "wrote %s for '%s' (%s) on %s as user %s; its release, key, trust and edgerun in %s (checked as %s)"
        % (
            path,
            bundle.manifest.data.get("name"),
            bundle.manifest_sha256[:16],
            args.source,
            args.user,
            state,
            args.user,
        )
    )
    print(
        "enabled and started: journalctl -u edgerun-%s -f; edgerun service status --name %s" % (args.name, args.name)
        if not args.no_enable
        else "not enabled (--no-enable): sudo systemctl enable --now edgerun-%s" % args.name
    )
    return 0


def add_parser(sub):
    p = sub.add_parser("service", help="the line as a systemd service: install the unit, show its status")
    p.add_argument("action", choices=["install", "status"])
    p.add_argument("bundle", nargs="?", help="install: bundle folder or .edb the service runs")
    p.add_argument("--name", default="line", help="the unit is edgerun-NAME, its state /var/lib/edgerun/NAME")
    p.add_argument("--source", help="install: the camera (csi://0, usb://0, /dev/videoN, rtsp://...)")
    p.add_argument("--engine", help="install: the TensorRT engine (default: ONNX Runtime)")
    p.add_argument("--reject-class")
    p.add_argument("--threshold", type=PROBABILITY, help="install: the reject threshold (a probability)")
    p.add_argument("--soak", action="store_true", help="install: also sample memory and temperature (--soak)")
    p.add_argument("--user", default="edgerun", help="install: the unprivileged account it runs as")
    p.add_argument("--group", default="video", help="install: the camera devices' group")
    p.add_argument(
        "--watchdog", type=int, default=30, help="install: seconds without a frame before systemd restarts it"
    )
    p.add_argument("--unit-dir", default="/etc/systemd/system")
    p.add_argument(
        "--python",
        help="install: the python the unit runs (default: this one); it and its packages must be readable by --user",
    )
    p.add_argument("--no-enable", action="store_true", help="install: write the unit only (no systemctl)")
    p.add_argument(
        "--state-root",
        default="/var/lib/edgerun",
        help="where the services' state lives: install stages the release, the service's engine key, its trust "
        "and edgerun in STATE_ROOT/NAME (default /var/lib/edgerun, systemd's StateDirectory)",
    )
    p.add_argument("--json", action="store_true", help="status: print JSON")
    add_trust_args(p)
    p.set_defaults(handler=cmd_service)
