"""``edgerun build``: a TensorRT engine from a bundle, with its sealed record."""

import os

from edgerun.bench import to_json
from edgerun.cli.common import add_trust_args, open_from_args


def cmd_build(args):
    from edgerun.device import gpu_properties
    from edgerun.runtime.trt_build import BuildSpec, build_engine

    bundle = open_from_args(args)
    base = os.path.basename(os.path.normpath(args.bundle))
    stem = base[: -len(".edb")] if base.endswith(".edb") else bundle.manifest.data["name"]
    output = args.output or "%s.%s.engine" % (stem, args.precision)  # student.edb -> student.fp16.engine
    meta = build_engine(
        bundle,
        BuildSpec(
            precision=args.precision,
            output=output,
            workspace_mb=args.workspace_mb,
            timing_cache=args.timing_cache,
            force=args.force,
            gpu=gpu_properties(),
            dla_core=args.dla,
            gpu_fallback=args.gpu_fallback,
            dla_batch=args.dla_batch,
        ),
    )
    print(to_json(meta))
    if meta.get("dla"):
        dla = meta["dla"]
        print("on DLA core %d at batch %d: every layer but those listed next" % (dla["core"], dla["batch"]))
        print("on the GPU (the DLA cannot run them): %s" % (", ".join(dla["gpu_layers"]) or "none"))
    print(
        "built %s in %.1f s; next: edgerun validate %s --engine %s"
        % (meta["engine"], meta["build_seconds"], args.bundle, meta["engine"])
    )
    return 0


def add_parser(sub):
    p = sub.add_parser("build", help="build a TensorRT engine from a bundle")
    p.add_argument("bundle")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp16")
    p.add_argument("-o", "--output", help="engine file (default <name>.<precision>.engine)")
    p.add_argument("--workspace-mb", type=int, default=1024)
    p.add_argument("--timing-cache", default="edgerun.timing.cache", help="persistent timing cache file")
    p.add_argument("--force", action="store_true", help="build INT8 even where it is slower or rejected")
    p.add_argument(
        "--dla",
        type=int,
        metavar="N",
        help="build for Deep Learning Accelerator core N (Xavier, Orin NX, AGX Orin); FP16 or INT8",
    )
    p.add_argument(
        "--gpu-fallback",
        action="store_true",
        help="with --dla: run the layers the DLA cannot on the GPU (listed after the build)",
    )
    p.add_argument(
        "--dla-batch",
        type=int,
        metavar="N",
        help="with --dla and a dynamic-batch bundle: the one batch the DLA engine runs (default the profile's opt)",
    )
    add_trust_args(p)
    p.set_defaults(handler=cmd_build)
