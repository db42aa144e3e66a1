"""What the commands share: the bundle as the command line names it (held to the trust set and the pins), its runner,
the checks before any work, the outputs written atomically, the bundle's validation images through a runner,
and the flags every command that opens a bundle takes."""

import argparse
import contextlib
import os
import sys

import numpy as np

from edgerun.bench import to_json
from edgerun.bundle.bundle import open_bundle
from edgerun.errors import EdgerunError
from edgerun.preprocess import preprocess
from edgerun.runtime.runners import infer_chunk


def open_from_args(args, pinned=True):
    """The bundle named on the command line, held to the trust set and the pins when they are configured."""
    from edgerun.bundle.pins import resolve_pins
    from edgerun.bundle.signing import resolve_trust

    bundle = open_bundle(
        args.bundle,
        trust=resolve_trust(getattr(args, "trust", None)),
        max_unpack_mb=getattr(args, "max_unpack_mb", None),
        pins=resolve_pins(getattr(args, "pins", None)) if pinned else None,
    )
    if bundle.trust:
        sys.stderr.write("bundle signed by trusted key %s (%s)\n" % (bundle.signer, bundle.trust))
    if bundle.pinned_by:
        sys.stderr.write("bundle admitted by %s\n" % bundle.pinned_by)
    return bundle


def make_runner(args, bundle):
    if args.engine:
        from edgerun.device import gpu_properties
        from edgerun.runtime.trt_run import TrtRunner

        return TrtRunner(args.engine, bundle=bundle, gpu=gpu_properties())
    from edgerun.runtime.runners import OrtRunner

    return OrtRunner(bundle.variant_path(args.variant), threads=args.threads, precision=args.variant or "fp32")


@contextlib.contextmanager
def active_runner(args, bundle):
    """The command's runner, active, its model checked against the manifest (ONNX Runtime: the engine's own record
    is checked by TrtRunner)."""
    with make_runner(args, bundle) as runner:
        if not args.engine:
            check_model_matches(bundle, runner)
        yield runner


def check_model_matches(bundle, runner):
    """The manifest describes the model it ships: input and output names, input shape, one output per class. A
    bundle that disagrees is refused here, before it runs (not as an ONNX Runtime traceback, nor a camera that
    crashes on its first frame)."""
    m = bundle.manifest
    inputs = dict((i.name, i.shape) for i in runner.session.get_inputs())
    outputs = dict((o.name, o.shape) for o in runner.session.get_outputs())
    where = "bundle '%s'" % m.data.get("name")
    if m.input_name not in inputs:
        raise EdgerunError(
            "%s: the manifest's input '%s' is not an input of its model (%s)" % (where, m.input_name, ", ".join(inputs))
        )
    if m.output_name not in outputs:
        raise EdgerunError(
            "%s: the manifest's output '%s' is not an output of its model (%s)"
            % (where, m.output_name, ", ".join(outputs))
        )
    shape = inputs[m.input_name]
    declared = list(m.input_shape)
    if len(shape) != len(declared) or any(isinstance(a, int) and a != b for a, b in zip(shape[1:], declared[1:])):
        raise EdgerunError(
            "%s: the manifest's input shape %s differs from the model's %s: re-export the bundle"
            % (where, declared, list(shape))
        )
    width = outputs[m.output_name][-1]
    if isinstance(width, int) and width != len(m.classes):
        raise EdgerunError(
            "%s: the model has %d outputs and the manifest names %d classes/targets: re-export the "
            "bundle" % (where, width, len(m.classes))
        )


def check_outputs(args):
    """Every file a command will write (--json, --csv) goes into an existing folder: checked before the work."""
    for flag in ("json", "csv"):
        path = getattr(args, flag, None)
        if path and not isinstance(path, bool):
            folder = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(folder):
                raise EdgerunError(
                    "--%s %s: the folder '%s' does not exist; create it first (nothing was run)" % (flag, path, folder)
                )


def write_json(path, data):
    """Write ``data`` as JSON atomically: a full disk or a kill never leaves a truncated file in place of the old."""
    from edgerun.files import write_atomically

    write_atomically(path, to_json(data).encode("utf-8"))


def bundle_outputs(runner, bundle, batch=None):
    """(model outputs, labels) of ``runner`` on the bundle's validation images, preprocessed as the manifest says."""
    images, labels = bundle.validation()
    m = bundle.manifest
    batch = batch or m.input_shape[0]
    fixed = None if m.model.get("dynamic_batch") else m.input_shape[0]
    outputs = []
    for i in range(0, len(images), batch):
        feed = preprocess(images[i : i + batch], m.preprocess, input_order="RGB")
        outputs.append(np.asarray(infer_chunk(runner, feed, m.input_name, m.output_name, fixed)))
    return np.concatenate(outputs), labels


def evaluate_bundle(runner, bundle, batch=None):
    """Top-1 of ``runner`` on the bundle's labelled validation images."""
    logits, labels = bundle_outputs(runner, bundle, batch)
    return float((logits.argmax(1) == labels).mean())


def count(least):
    """An argparse type: an integer of at least ``least`` (argparse's own error, exit 2, otherwise)."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError("%r is not a whole number" % (text,)) from None
        if value < least:
            raise argparse.ArgumentTypeError("must be at least %d, not %d" % (least, value))
        return value

    return parse


def number(least=None, most=None, above=None):
    """An argparse type: a finite number (nan and inf refused), at least ``least``, at most ``most``, above
    ``above`` (argparse's own error, exit 2, otherwise)."""

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError("%r is not a number" % (text,)) from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError("%r is not a finite number" % (text,))
        if least is not None and value < least:
            raise argparse.ArgumentTypeError("must be at least %g, not %g" % (least, value))
        if most is not None and value > most:
            raise argparse.ArgumentTypeError("must be at most %g, not %g" % (most, value))
        if above is not None and value <= above:
            raise argparse.ArgumentTypeError("must be above %g, not %g" % (above, value))
        return value

    return parse


PROBABILITY = number(0.0, 1.0)  # a reject threshold on a class's probability


def add_trust_args(p):
    """--trust, --max-unpack-mb, --pins: what every command that opens a bundle takes."""
    p.add_argument(
        "--trust",
        help="accept only bundles signed by this public key (KEY.pub) or by a key in this "
        "folder (default: $EDGERUN_TRUST, else /etc/edgerun/trusted-keys if present)",
    )
    p.add_argument(
        "--max-unpack-mb",
        type=number(above=0),
        help="refuse an .edb that unpacks to more than this (default: $EDGERUN_MAX_UNPACK_MB, else 1024)",
    )
    p.add_argument(
        "--pins",
        help="run only the releases this pins file allows, per model name (default: "
        "$EDGERUN_PINS, else /etc/edgerun/pins.json if present; see `edgerun pin`)",
    )


def add_runner_args(p):
    """The bundle and its runner (--engine, else ONNX Runtime with --variant and --threads), and the trust flags."""
    p.add_argument("bundle", help="bundle folder or .edb file")
    p.add_argument("--engine", help="TensorRT engine from `edgerun build` (default: ONNX Runtime)")
    p.add_argument("--variant", default=None, help="ONNX Runtime only: fp32 (default) or int8")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    add_trust_args(p)
