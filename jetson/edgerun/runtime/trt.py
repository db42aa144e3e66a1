"""TensorRT on TensorRT 8.2 (JetPack 4.6.1) up to 10.x (JetPack 6): the version split and what build and run share.

Building lives in ``edgerun.runtime.trt_build`` (``build_engine``), running in ``edgerun.runtime.trt_run``
(``TrtRunner``); both reach TensorRT, pycuda and the device through this module's functions (tests replace
them here), and this module imports neither of them.

The API differences between generations live in one place, ``select_api``, which returns an adapter:

- TensorRT 8.x: explicit-batch networks, ``config.max_workspace_size`` (8.2; a memory-pool limit from 8.4),
  I/O by binding index, ``context.set_binding_shape`` and ``execute_async_v2(bindings, stream)``.
- TensorRT 10.x: I/O by tensor name (``num_io_tensors``, ``get_tensor_mode``), ``set_input_shape``,
  ``set_tensor_address`` and ``execute_async_v3(stream)``; implicit INT8 calibrators are deprecated.
- INT8 on every generation: bundles carry an explicit-quantization (Q/DQ) ONNX by TensorRT's rules, built without
  a calibrator (8.0 and later take Q/DQ); only older bundles fall back to the calibrator on 8.x.
- DLA (Xavier, Orin NX, AGX Orin): ``default_device_type``, ``DLA_core``, ``can_run_on_DLA`` and the
  ``GPU_FALLBACK`` flag, the same names on 8.x and 10.x.

Versions are compared as tuples of integers (``edgerun.profiles.parse_version``), never as strings. Tensor
types map to numpy through this module's own table: ``trt.nptype`` of TensorRT 8.5 refers to ``np.bool``,
which numpy 1.24 removed (NVIDIA/TensorRT#2557). CUDA comes from the device's primary context
(``pycuda.autoprimaryctx``, as NVIDIA's samples do), made current before TensorRT touches CUDA.
``tensorrt`` and ``pycuda`` are imported only when a build or a runner needs them; tests pass small fakes
of both modules through the ``trt``/``cuda`` arguments.
"""

import json
import os

import numpy as np

from edgerun.bundle.manifest import MANIFEST_FILE, sha256_file

# board_model, is_tegra and l4t_release are read through this module by trt_build and trt_run (and replaced here
# by tests), so that a device fact has one place
from edgerun.device import BOARD_ENV, BOARD_FILE, board_model, is_tegra, l4t_release  # noqa: F401
from edgerun.errors import EngineBuildError, EngineMismatchError, RunnerError
from edgerun.profiles import parse_version
from edgerun.runtime.engine_record import check_sealed, device_key

OOM_MARKERS = ("out of memory", "outofmemory", "failed to allocate", "cudaerrormemoryallocation", "insufficient memory")


def import_tensorrt():
    try:
        import tensorrt
    except ImportError:
        tensorrt = None
    if not hasattr(tensorrt, "Builder"):  # absent, or only type stubs (tensorrt-stubs: a namespace package)
        raise EngineBuildError(
            "TensorRT's Python module is not importable: on a Jetson it comes with JetPack "
            "(python3-libnvinfer); in a virtualenv create it with --system-site-packages"
        )
    return tensorrt


# The CUDA context's own memory, measured when this process made it (a Jetson's shared DRAM: MemAvailable before
# and after, less this process's RSS growth): the runner's free-memory figure starts after the context exists.
CUDA_CONTEXT = {"mb": None}


def measure_context(create, tegra, available=None, rss=None):
    """Call ``create`` (which makes the CUDA context) and return the DRAM it took in MB on a Jetson (``tegra``):
    the drop of /proc/meminfo's MemAvailable less this process's RSS growth (host memory, counted in VmHWM);
    None elsewhere (a discrete GPU's context is on the card)."""
    from edgerun.device import meminfo, process_memory_mb

    available = available or (lambda: meminfo().get("MemAvailable"))
    rss = rss or (lambda: process_memory_mb()[0])
    before = (available(), rss()) if tegra else (None, None)
    create()
    if None in before:
        return None
    after = (available(), rss())
    if None in after:
        return None
    return max(0.0, (before[0] - after[0]) - max(0.0, after[1] - before[1]))


def _primary_context():
    try:
        import pycuda.autoprimaryctx  # noqa: F401  (pycuda >= 2021.1)
    except ImportError as exc:
        if "autoprimaryctx" not in str(exc):  # pycuda is there and failed inside (the driver library): not "old"
            raise
        import pycuda.autoinit  # noqa: F401


def import_cuda():
    """pycuda's driver with the device's primary context current (one context for builder, calibrator and
    runner); ``pycuda.autoinit`` (a new, non-primary context) only where pycuda predates autoprimaryctx. The
    context's own memory is measured as it is made (``CUDA_CONTEXT``)."""
    import sys

    try:
        if "pycuda.driver" in sys.modules:
            _primary_context()
        else:
            CUDA_CONTEXT["mb"] = measure_context(_primary_context, is_tegra())
        import pycuda.driver as cuda
    except ImportError as exc:
        if "libcuda" in str(exc) or "libnvidia" in str(exc):  # pycuda is there; the driver library is not
            raise RunnerError(
                "the CUDA driver library is not visible to this process (%s): in a container, run it with "
                "--runtime nvidia (which mounts the driver); on the board, JetPack's driver lives in "
                "/usr/lib/aarch64-linux-gnu/tegra (check `ldconfig -p | grep libcuda`)" % exc
            ) from None
        raise RunnerError(
            "pycuda is not installed (%s): pip3 install pycuda (it builds against JetPack's CUDA)" % exc
        ) from None
    except Exception as exc:  # pycuda._driver.Error's subclasses (RuntimeError, LogicError): cuInit, no device
        if not type(exc).__module__.startswith("pycuda"):
            raise
        raise RunnerError(
            "no CUDA GPU is visible to this process (%s): in a container, run it with --runtime "
            "nvidia; on the host, check that the GPU driver is loaded (`edgerun info`)" % exc
        ) from exc
    return cuda


def cuda_context(cuda):
    """The CUDA context current on this thread, checked: pycuda answers None (or raises its own error) when
    none is, and the runner pushes it around every call from any thread."""
    context = cuda.Context.get_current()
    if context is None:
        raise RunnerError(
            "no CUDA context is current on this thread (pycuda's primary context was made on another thread, or "
            "could not be made current: another program may hold the GPU in exclusive mode, or the driver "
            "failed); `edgerun info` shows the GPU"
        )
    try:
        free, total = cuda.mem_get_info()
    except Exception as exc:  # pycuda._driver.Error: the context exists but the driver refuses it
        if not type(exc).__module__.startswith("pycuda"):
            raise
        raise RunnerError("the CUDA context does not answer (%s): `edgerun info` shows the GPU" % exc) from exc
    return context, free, total


# TensorRT DataType member name -> numpy type (types numpy lacks, BF16, FP8, INT4, are refused by name)
NUMPY_TYPES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "INT8": "int8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
    "UINT8": "uint8",
}


def numpy_dtype(trt_dtype):
    name = getattr(trt_dtype, "name", None) or str(trt_dtype).rsplit(".", 1)[-1]
    if name not in NUMPY_TYPES:
        raise RunnerError(
            "engine tensor type %s has no numpy equivalent (supported: %s)" % (name, ", ".join(sorted(NUMPY_TYPES)))
        )
    return np.dtype(NUMPY_TYPES[name])


# ------------------------------------------------------------------------------------------ the version split
class _Api(object):
    """What both generations' adapters hold: the module and its version as a tuple."""

    def __init__(self, trt):
        self.trt = trt
        self.version = parse_version(trt.__version__)


class _Api8(_Api):
    """TensorRT 8.x (8.2.1 on JetPack 4.6.1 and later 4.6.x, 8.5 on JetPack 5)."""

    generation = 8

    def create_network(self, builder):
        flag = 1 << int(self.trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        return builder.create_network(flag)

    def set_workspace(self, config, nbytes):
        if self.version >= (8, 4) and hasattr(config, "set_memory_pool_limit"):
            config.set_memory_pool_limit(self.trt.MemoryPoolType.WORKSPACE, nbytes)
        else:
            config.max_workspace_size = nbytes

    def io_tensors(self, engine):
        out = []
        for i in range(engine.num_bindings):
            out.append(
                {
                    "name": engine.get_binding_name(i),
                    "index": i,
                    "is_input": engine.binding_is_input(i),
                    "shape": tuple(engine.get_binding_shape(i)),
                    "dtype": numpy_dtype(engine.get_binding_dtype(i)),
                }
            )
        return out

    def set_input_shape(self, context, tensor, shape):
        return bool(context.set_binding_shape(tensor["index"], tuple(shape)))

    def output_shape(self, context, tensor):
        return tuple(context.get_binding_shape(tensor["index"]))

    def execute(self, context, tensors, addresses, stream):
        bindings = [0] * len(tensors)
        for tensor in tensors:
            bindings[tensor["index"]] = int(addresses[tensor["name"]])
        if not context.execute_async_v2(bindings=bindings, stream_handle=stream.handle):
            raise RunnerError("TensorRT execute_async_v2 failed")


class _Api10(_Api):
    """TensorRT 10.x (10.3 on JetPack 6.1/6.2)."""

    generation = 10

    def create_network(self, builder):
        return builder.create_network(0)  # every network is explicit-batch; the flag is deprecated

    def set_workspace(self, config, nbytes):
        config.set_memory_pool_limit(self.trt.MemoryPoolType.WORKSPACE, nbytes)

    def io_tensors(self, engine):
        out = []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            out.append(
                {
                    "name": name,
                    "index": i,
                    "is_input": engine.get_tensor_mode(name) == self.trt.TensorIOMode.INPUT,
                    "shape": tuple(engine.get_tensor_shape(name)),
                    "dtype": numpy_dtype(engine.get_tensor_dtype(name)),
                }
            )
        return out

    def set_input_shape(self, context, tensor, shape):
        return bool(context.set_input_shape(tensor["name"], tuple(shape)))

    def output_shape(self, context, tensor):
        return tuple(context.get_tensor_shape(tensor["name"]))

    def execute(self, context, tensors, addresses, stream):
        for tensor in tensors:
            if not context.set_tensor_address(tensor["name"], int(addresses[tensor["name"]])):
                raise RunnerError("TensorRT refused the address of tensor '%s'" % tensor["name"])
        if not context.execute_async_v3(stream_handle=stream.handle):
            raise RunnerError("TensorRT execute_async_v3 failed")


def select_api(trt):
    """The one place where TensorRT generations are told apart."""
    version = parse_version(trt.__version__)
    if version >= (10,):
        return _Api10(trt)
    if version >= (8, 2):
        return _Api8(trt)
    raise EngineBuildError(TOO_OLD % trt.__version__)


# JetPack 4.6 (L4T R32.6.1) ships TensorRT 8.0.1; 8.2.1 came with JetPack 4.6.1 (L4T R32.7.1). edgerun was written
# against 8.2.1's bindings and never checked against 8.0's, so 8.0 is refused, saying exactly which release works.
TOO_OLD = (
    "TensorRT %s is too old for edgerun, which needs 8.2.1 or newer: JetPack 4.6 (L4T R32.6.1) ships TensorRT 8.0.1, "
    "8.2.1 came with JetPack 4.6.1 (L4T R32.7.1). Update the board to JetPack 4.6.1 or later (NVIDIA's OTA update: "
    "point /etc/apt/sources.list.d/nvidia-l4t-apt-source.list at r32.7, then sudo apt update && sudo apt "
    "dist-upgrade; or a fresh SD card image); it is the last JetPack for the Nano and TX2"
)


# ------------------------------------------------------------------------------------------------- logging
def make_logger(trt):
    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.messages = []

        def log(self, severity, msg):
            self.messages.append((severity, msg))
            if int(severity) <= int(trt.ILogger.Severity.WARNING):
                print("[TensorRT] %s" % msg)

    return _Logger()


def _is_oom(messages):
    text = " ".join(str(m) for _, m in messages).lower().replace(" ", "")
    return any(marker.replace(" ", "") in text for marker in OOM_MARKERS)


# ------------------------------------------------------------------------------------------------ records
def engine_meta_path(engine_path):
    """The engine's record, beside it: student.fp16.engine -> student.fp16.engine.json."""
    return str(engine_path) + ".json"


def bundle_fingerprint(bundle):
    """sha256 of the manifest, which itself lists the sha256 of every bundle file."""
    return sha256_file(os.path.join(bundle.folder, MANIFEST_FILE))


def check_engine(engine_path, bundle=None, trt=None, gpu=None, board=None, engine_bytes=None):
    """Refuse an engine made by another TensorRT version, on another device (compute capability and board
    model: Orin Nano and AGX Orin are both 8.7), or for another bundle; with ``engine_bytes`` (the bytes about to be
    deserialized), also one whose bytes differ from its record or whose record this device did not seal."""
    meta_path = engine_meta_path(engine_path)
    if not os.path.isfile(str(engine_path)):
        raise EngineMismatchError("engine '%s' does not exist: build it with `edgerun build`" % engine_path)
    if not os.path.isfile(meta_path):
        raise EngineMismatchError(
            "engine '%s' has no %s beside it, so its origin is unknown: rebuild it with "
            "`edgerun build`" % (engine_path, os.path.basename(meta_path))
        )
    try:
        with open(meta_path) as fh:
            meta = json.load(fh)
    except (OSError, IOError, ValueError) as exc:
        raise EngineMismatchError(
            "the record of engine '%s' (%s) cannot be read (%s): rebuild the engine with `edgerun build`"
            % (engine_path, meta_path, exc)
        ) from exc
    if not isinstance(meta, dict):
        raise EngineMismatchError(
            "the record of engine '%s' (%s) is not a JSON object: rebuild the engine with `edgerun build`"
            % (engine_path, meta_path)
        )
    if trt is not None and parse_version(meta.get("tensorrt", "0")) != parse_version(trt.__version__):
        raise EngineMismatchError(
            "engine '%s' was built with TensorRT %s, this device has %s: engines are not "
            "portable across TensorRT versions; rebuild it with `edgerun build`"
            % (engine_path, meta.get("tensorrt"), trt.__version__)
        )
    if gpu and meta.get("compute_capability") and meta["compute_capability"] != gpu.get("compute_capability"):
        raise EngineMismatchError(
            "engine '%s' was built on %s (compute capability %s), this is %s (%s): rebuild "
            "it with `edgerun build`"
            % (
                engine_path,
                meta.get("device"),
                meta["compute_capability"],
                gpu.get("name"),
                gpu.get("compute_capability"),
            )
        )
    board = board if board is not None else board_model()
    if meta.get("board") and not board and is_tegra():
        raise EngineMismatchError(
            "engine '%s' was built on a %s, and this Jetson cannot see its own model (a "
            "container?): mount it (-v /proc/device-tree/model:%s:ro) or set $%s, so that an "
            "engine tuned to another board is never run here" % (engine_path, meta["board"], BOARD_FILE, BOARD_ENV)
        )
    if board and meta.get("board") and meta["board"] != board:
        raise EngineMismatchError(
            "engine '%s' was built on a %s, this is a %s: an engine is tuned to its board's "
            "GPU and memory; rebuild it with `edgerun build`" % (engine_path, meta["board"], board)
        )
    if engine_bytes is not None:
        check_sealed(meta, engine_bytes, engine_path, device_key())
    if bundle is not None and meta.get("bundle_sha256") != bundle_fingerprint(bundle):
        raise EngineMismatchError(
            "engine '%s' was built from another bundle (or a changed one): rebuild it with "
            "`edgerun build`" % engine_path
        )
    return meta


__all__ = [
    "import_tensorrt",
    "import_cuda",
    "numpy_dtype",
    "select_api",
    "make_logger",
    "engine_meta_path",
    "bundle_fingerprint",
    "check_engine",
    "board_model",
    "is_tegra",
    "l4t_release",
]
