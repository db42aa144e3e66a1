"""``edgerun``: the device's command line.

    edgerun info                                              device, JetPack/L4T, TensorRT, CUDA, memory, clocks
    edgerun build BUNDLE --precision fp16|int8|fp32           -> <name>.<precision>.engine + .engine.json
    edgerun validate BUNDLE [--engine E]                      accuracy on the bundle's val.npz vs the host
    edgerun bench BUNDLE [--engine E] --fps-target 30 --budget-mb 500
    edgerun camera BUNDLE [--engine E] --source csi://0 --fps-target 30 --duration 60
    edgerun verify BUNDLE [--trust KEY.pub|DIR]               every file's sha256, the signature, the pins
    edgerun pin BUNDLE [--rule allow|not_before]              approve this release in the pins file

Without --engine, the ONNX Runtime runner runs the bundle's ONNX model (``--variant int8`` for the host
INT8 model). Exit status: 0 done/PASS, 1 FAIL (bench/camera with --strict, validate over its threshold),
2 error.

Trust: with --trust KEY.pub or a folder of .pub files (else $EDGERUN_TRUST, else /etc/edgerun/trusted-keys
when that folder exists) every command refuses a bundle that is unsigned, signed by another key, or changed
in any byte since it was signed (`edgedistill pack BUNDLE -o X.edb --sign KEY`).
Pins: with --pins FILE (else $EDGERUN_PINS, else /etc/edgerun/pins.json when it exists) only the releases it
allows run, per model name: older bundles signed by the same key are refused (see edgerun/bundle/pins.py).
"""

import argparse
import sys

from edgerun.cli import bench, build, camera, info, pin, service, slot, validate, verify
from edgerun.errors import EdgerunError

# the commands in the order --help lists them
COMMANDS = (info, build, validate, bench, camera, service, verify, slot, pin)


def build_parser():
    from edgerun import __version__

    parser = argparse.ArgumentParser(
        prog="edgerun", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version="edgerun %s" % __version__)
    sub = parser.add_subparsers(dest="command")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except EdgerunError as exc:
        sys.stderr.write("error: %s\n" % exc)
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
