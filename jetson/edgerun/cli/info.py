"""``edgerun info``: the device (board, JetPack/L4T, TensorRT, CUDA, memory, clocks) and the trust set and pins it
applies."""

from edgerun.bench import to_json
from edgerun.errors import EdgerunError


def trust_state():
    """The trust set and pins this device applies, as `edgedistill deploy` asks before it copies a bundle: the
    trusted key ids (None where no trust is configured), or the reason they cannot be read."""
    import platform

    from edgerun import __version__
    from edgerun.bundle.pins import resolve_pins
    from edgerun.bundle.signing import load_trust, resolve_trust

    state = {"edgerun": __version__, "python": platform.python_version(), "trust": None, "pins": None}
    try:
        source = resolve_trust()
        if source:
            state["trust"] = {"source": source, "key_ids": sorted(load_trust(source))}
        state["pins"] = resolve_pins()
    except EdgerunError as exc:
        state["trust_error"] = str(exc)
    return state


def cmd_info(args):
    from edgerun.device import device_info

    info = device_info()
    info.update(trust_state())
    if args.json:
        print(to_json(info))
        return 0
    for key in (
        "board",
        "l4t",
        "tensorrt",
        "cuda",
        "memory_total_mb",
        "memory_available_mb",
        "swap_total_mb",
        "nvpmodel",
        "gpu",
        "profile",
        "edgerun",
        "python",
        "trust",
        "pins",
    ):
        print("%-20s %s" % (key, info.get(key) if info.get(key) is not None else "-"))
    maxed = info["clocks"].get("maxed")
    print(
        "%-20s %s"
        % (
            "clocks pinned",
            {True: "yes (jetson_clocks)", False: "no: run sudo jetson_clocks before benchmarking", None: "unknown"}[
                maxed
            ],
        )
    )
    return 0


def add_parser(sub):
    p = sub.add_parser("info", help="device, JetPack/L4T, TensorRT, CUDA, memory, clocks")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_info)
