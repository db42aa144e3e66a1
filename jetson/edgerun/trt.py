"""TensorRT: build engines from a bundle and run them, on TensorRT 8.2 (JetPack 4.6) up to 10.x (JetPack 6).

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
import re
import time
from datetime import datetime

import numpy as np

from .device import BOARD_ENV, BOARD_FILE, board_model, is_tegra, l4t_release, process_memory_mb
from .engine_record import check_sealed, device_key, seal, write_atomically
from .errors import EngineBuildError, EngineMismatchError, RunnerError
from .manifest import MANIFEST_FILE, sha256_file
from .profiles import explicit_int8_variant, parse_version
from .runners import Runner

OOM_MARKERS = ("out of memory", "outofmemory", "failed to allocate", "cudaerrormemoryallocation", "insufficient memory")


def import_tensorrt():
    try:
        import tensorrt
    except ImportError:
        tensorrt = None
    if not hasattr(tensorrt, "Builder"):  # absent, or only type stubs (tensorrt-stubs: a namespace package)
        raise EngineBuildError("TensorRT's Python module is not importable: on a Jetson it comes with JetPack "
                               "(python3-libnvinfer); in a virtualenv create it with --system-site-packages")
    return tensorrt


def import_cuda():
    """pycuda's driver with the device's primary context current (one context for builder, calibrator and
    runner); ``pycuda.autoinit`` (a new, non-primary context) only where pycuda predates autoprimaryctx."""
    try:
        try:
            import pycuda.autoprimaryctx  # noqa: F401  (pycuda >= 2021.1)
        except ImportError:
            import pycuda.autoinit  # noqa: F401
        import pycuda.driver as cuda
    except ImportError:
        raise RunnerError("pycuda is not installed: pip3 install pycuda (it builds against JetPack's CUDA)")
    except Exception as exc:  # pycuda._driver.Error's subclasses (RuntimeError, LogicError): cuInit, no device
        if not type(exc).__module__.startswith("pycuda"):
            raise
        raise RunnerError("no CUDA GPU is visible to this process (%s): in a container, run it with --runtime "
                          "nvidia; on the host, check that the GPU driver is loaded (`edgerun info`)" % exc)
    return cuda


# TensorRT DataType member name -> numpy type (types numpy lacks, BF16, FP8, INT4, are refused by name)
NUMPY_TYPES = {"FLOAT": "float32", "HALF": "float16", "INT8": "int8", "INT32": "int32", "INT64": "int64",
               "BOOL": "bool", "UINT8": "uint8"}


def numpy_dtype(trt_dtype):
    name = getattr(trt_dtype, "name", None) or str(trt_dtype).rsplit(".", 1)[-1]
    if name not in NUMPY_TYPES:
        raise RunnerError("engine tensor type %s has no numpy equivalent (supported: %s)"
                          % (name, ", ".join(sorted(NUMPY_TYPES))))
    return np.dtype(NUMPY_TYPES[name])


# ------------------------------------------------------------------------------------------ the version split
class _Api(object):
    """What both generations' adapters hold: the module and its version as a tuple."""

    def __init__(self, trt):
        self.trt = trt
        self.version = parse_version(trt.__version__)


class _Api8(_Api):
    """TensorRT 8.x (8.2 on JetPack 4.6, 8.5 on JetPack 5)."""

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
            out.append({"name": engine.get_binding_name(i), "index": i, "is_input": engine.binding_is_input(i),
                        "shape": tuple(engine.get_binding_shape(i)),
                        "dtype": numpy_dtype(engine.get_binding_dtype(i))})
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
            out.append({"name": name, "index": i,
                        "is_input": engine.get_tensor_mode(name) == self.trt.TensorIOMode.INPUT,
                        "shape": tuple(engine.get_tensor_shape(name)),
                        "dtype": numpy_dtype(engine.get_tensor_dtype(name))})
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
    raise EngineBuildError("TensorRT %s is too old: edgerun supports 8.2 (JetPack 4.6) and newer" % trt.__version__)


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


# --------------------------------------------------------------------------------------------- calibration
def calibration_cache_path(output, bundle_sha256, batch, dynamic=None):
    """The INT8 calibration cache of one bundle, batch and profile: a changed bundle never reuses stale scales."""
    profile = "-dyn%d-%d-%d" % (dynamic["min"], dynamic["opt"], dynamic["max"]) if dynamic else ""
    return "%s.calib-%s-b%d%s.cache" % (output, bundle_sha256[:16], batch, profile)


def make_entropy_calibrator(trt, cuda, batches, cache_path, batch_size):
    """IInt8EntropyCalibrator2 fed from the bundle's calib.npy (model-ready float32), with a cache file."""

    class _Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.batches = batches
            self.index = 0
            self.device = cuda.mem_alloc(int(np.prod((batch_size,) + tuple(batches.shape[1:]))) * 4)

        def get_batch_size(self):
            return batch_size

        def get_batch(self, names):
            if self.index + batch_size > len(self.batches):
                return None
            chunk = np.ascontiguousarray(self.batches[self.index:self.index + batch_size], dtype=np.float32)
            cuda.memcpy_htod(self.device, chunk)
            self.index += batch_size
            return [int(self.device)]

        def read_calibration_cache(self):
            if os.path.isfile(cache_path):
                with open(cache_path, "rb") as fh:
                    return fh.read()
            return None

        def write_calibration_cache(self, cache):
            with open(cache_path, "wb") as fh:
                fh.write(bytes(cache))

    return _Calibrator()


# --------------------------------------------------------------------------------------------------- build
def engine_meta_path(engine_path):
    """The engine's record, beside it: student.fp16.engine -> student.fp16.engine.json."""
    return str(engine_path) + ".json"


def bundle_fingerprint(bundle):
    """sha256 of the manifest, which itself lists the sha256 of every bundle file."""
    return sha256_file(os.path.join(bundle.folder, MANIFEST_FILE))


def check_int8_allowed(precision, target, gpu, force, builder=None):
    """INT8 where the GPU lacks a fast INT8 path (Nano sm_53, TX2 sm_62) is slower than FP16: refuse."""
    if precision != "int8":
        return
    fast = builder.platform_has_fast_int8 if builder is not None else bool(target.get("fast_int8"))
    if not fast and not force:
        where = (gpu or {}).get("name") or target.get("device") or "this GPU"
        cc = (gpu or {}).get("compute_capability") or target.get("compute_capability")
        raise EngineBuildError("INT8 refused on %s (compute capability %s): it has no fast INT8 path, so INT8 "
                               "runs slower than FP16 there; build --precision fp16, or pass --force to build "
                               "INT8 anyway" % (where, cc))


def _parse_onnx(trt, api, builder, logger, onnx_path):
    network = api.create_network(builder)
    parser = trt.OnnxParser(network, logger)
    with open(onnx_path, "rb") as fh:
        ok = parser.parse(fh.read())
    if not ok:
        problems = []
        for i in range(parser.num_errors):
            err = parser.get_error(i)
            node = err.node()
            name = err.node_name() if hasattr(err, "node_name") else ""
            op = err.node_operator() if hasattr(err, "node_operator") else ""
            problems.append("node %s%s%s: %s" % (node, " '%s'" % name if name else "", " (%s)" % op if op else "",
                                                err.desc()))
        raise EngineBuildError("TensorRT %s's ONNX parser rejected %s:\n  %s\nRe-export for this target "
                               "(edgedistill export --target ...), which checks operators per TensorRT version"
                               % (trt.__version__, os.path.basename(onnx_path), "\n  ".join(problems) or "no detail"))
    return network, parser


def check_dla(builder, target, dla_core, precision):
    """``--dla N``: refused where the board has no Deep Learning Accelerator (by the builder, else the profile), for
    a core it lacks, or at FP32 (the DLA runs FP16 and INT8)."""
    if dla_core is None:
        return
    cores = getattr(builder, "num_DLA_cores", None)
    if cores is None:
        cores = target.get("dla_cores", 0)
    where = target.get("device") or "this device"
    if not cores:
        raise EngineBuildError("--dla: %s has no Deep Learning Accelerator (Jetson Nano, TX2 and Orin Nano have none; "
                               "Xavier NX, AGX Xavier, Orin NX and AGX Orin have DLA cores): build without --dla"
                               % where)
    if not 0 <= int(dla_core) < cores:
        raise EngineBuildError("--dla %s: %s has %d DLA core(s), numbered 0 to %d" % (dla_core, where, cores, cores - 1))
    if precision == "fp32":
        raise EngineBuildError("--dla: the DLA runs FP16 and INT8, not FP32: add --precision fp16 or int8")


def dla_fallback_layers(network, config):
    """Names of the layers the DLA cannot run (they run on the GPU with --gpu-fallback)."""
    return [network.get_layer(i).name for i in range(network.num_layers)
            if not config.can_run_on_DLA(network.get_layer(i))]


def build_engine(bundle, precision="fp16", output=None, workspace_mb=1024, timing_cache=None, force=False,
                 target=None, gpu=None, trt=None, cuda=None, log=print, board=None, dla_core=None,
                 gpu_fallback=False):
    """Build and serialize an engine for ``bundle``; write ``<output>`` and ``<output>.json``.

    INT8 engines come from the bundle's explicit-quantization model (Q/DQ, no calibrator) when it has one; older
    bundles are calibrated from ``calib.npy`` (TensorRT 8.x). ``dla_core`` builds for that Deep Learning
    Accelerator core; layers it cannot run are refused, or run on the GPU with ``gpu_fallback`` (listed in the
    engine's record).

    On an out-of-memory build the workspace is halved and the build tried once more; a second failure
    says so and points at swap. Returns the engine's metadata dictionary.
    """
    if precision not in ("fp32", "fp16", "int8"):
        raise EngineBuildError("precision must be fp32, fp16 or int8, not %r" % (precision,))
    cuda = cuda or import_cuda()  # the primary context is current before TensorRT touches CUDA
    trt = trt or import_tensorrt()
    api = select_api(trt)
    manifest = bundle.manifest
    target = target or manifest.data.get("target_facts") or {}
    logger = make_logger(trt)
    builder = trt.Builder(logger)
    check_int8_allowed(precision, target, gpu, force, builder)

    onnx_file = bundle.model_path
    explicit_int8 = False
    if precision == "int8":
        variant = explicit_int8_variant(manifest)
        if variant is not None:
            explicit_int8 = True  # Q/DQ in the graph: no calibrator, on 8.2, 8.5 and 10.x alike
            if variant.get("status") == "rejected" and not force:
                raise EngineBuildError("the bundle's INT8 model was rejected on the host (%s drop %.2f points, over "
                                       "its gate); pass --force to build it anyway" % (
                                           variant.get("method", "INT8"), 100 * variant.get("drop", 0)))
            onnx_file = bundle.path(variant["file"])
        elif api.generation >= 10:
            raise EngineBuildError("TensorRT %s builds INT8 from an explicit-quantization (QDQ) ONNX, which this "
                                   "bundle lacks: re-export it with this edgedistill (every bundle now carries one), "
                                   "or with a TensorRT 10 target (e.g. --target jetson-orin-nano-jp6)" % trt.__version__)
    check_dla(builder, target, dla_core, precision)
    network, _parser = _parse_onnx(trt, api, builder, logger, onnx_file)

    output = output or os.path.join(os.getcwd(), "%s.%s.engine" % (manifest.data["name"], precision))
    board = board if board is not None else board_model()
    cache_path = timing_cache_path(timing_cache, trt.__version__, board, gpu) if timing_cache else None
    workspace = int(workspace_mb) << 20
    attempt = 0
    while True:
        attempt += 1
        config = builder.create_builder_config()
        api.set_workspace(config, workspace)
        if precision in ("fp16", "int8"):
            if not builder.platform_has_fast_fp16:
                log("note: this GPU has no fast FP16 path; FP16 layers may not be faster than FP32")
            config.set_flag(trt.BuilderFlag.FP16)
        dyn = manifest.model.get("dynamic_batch")
        profile = None
        if dyn:
            profile = builder.create_optimization_profile()
            rest = tuple(manifest.input_shape[1:])
            profile.set_shape(manifest.input_name, (dyn["min"],) + rest, (dyn["opt"],) + rest, (dyn["max"],) + rest)
            if config.add_optimization_profile(profile) < 0:  # TensorRT returns -1 for a profile it refuses
                raise EngineBuildError("TensorRT refused the optimization profile of the dynamic batch (min %d, opt %d, "
                                       "max %d for '%s'): re-export with min <= opt <= max"
                                       % (dyn["min"], dyn["opt"], dyn["max"], manifest.input_name))
        gpu_layers = None
        if dla_core is not None:
            config.default_device_type = trt.DeviceType.DLA
            config.DLA_core = int(dla_core)
            gpu_layers = dla_fallback_layers(network, config)
            if gpu_layers and not gpu_fallback:
                raise EngineBuildError("%d layer(s) cannot run on the DLA (first: %s): add --gpu-fallback to run them "
                                       "on the GPU" % (len(gpu_layers), ", ".join(gpu_layers[:5])))
            if gpu_fallback:
                config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
            if not explicit_int8:
                batch = dyn["opt"] if dyn else manifest.input_shape[0]  # calibration runs at the profile's opt
                config.int8_calibrator = make_entropy_calibrator(
                    trt, cuda, bundle.calibration(),
                    calibration_cache_path(output, bundle_fingerprint(bundle), batch, dyn), batch)
                if profile is not None and not config.set_calibration_profile(profile):
                    raise EngineBuildError("TensorRT refused the calibration profile of the dynamic batch")
        cache = _use_timing_cache(config, cache_path, log) if cache_path else None
        started = time.time()
        del logger.messages[:]
        try:
            serialized = builder.build_serialized_network(network, config)
        except MemoryError:
            serialized = None
            logger.messages.append((0, "out of memory (MemoryError)"))
        if serialized is not None:
            break
        if _is_oom(logger.messages) and attempt == 1 and workspace > (16 << 20):
            workspace //= 2
            log("engine build ran out of memory; retrying with a %d MB workspace" % (workspace >> 20))
            continue
        detail = "; ".join(str(m) for s, m in logger.messages[-5:]) or "no detail from TensorRT"
        if _is_oom(logger.messages):
            raise EngineBuildError("engine build ran out of memory twice (workspace down to %d MB): close other "
                                   "programs, add swap (e.g. a 4 GB swap file on the Nano: sudo fallocate -l 4G "
                                   "/swapfile && sudo mkswap /swapfile && sudo swapon /swapfile) or use a smaller "
                                   "--workspace-mb. TensorRT said: %s" % (workspace >> 20, detail))
        raise EngineBuildError("TensorRT could not build the engine: %s" % detail)
    build_seconds = time.time() - started
    engine_bytes = bytes(serialized)
    key = device_key(create=True)  # before anything is written: a device that cannot seal builds nothing
    meta = {
        "engine": os.path.basename(output),
        "tensorrt": trt.__version__,
        "device": (gpu or {}).get("name"),
        "compute_capability": (gpu or {}).get("compute_capability"),
        "l4t": l4t_release(),
        "board": board,
        "precision": precision,
        "onnx": os.path.basename(onnx_file),
        "explicit_quantization": explicit_int8,
        "dla": None if dla_core is None else {"core": int(dla_core), "gpu_fallback": bool(gpu_fallback),
                                              "gpu_layers": gpu_layers},
        "bundle_sha256": bundle_fingerprint(bundle),
        "bundle_name": manifest.data["name"],
        "workspace_mb": workspace >> 20,
        "build_seconds": round(build_seconds, 2),
        "created": datetime.utcnow().replace(microsecond=0).isoformat() + "Z",
    }
    meta = seal(meta, engine_bytes, key)  # the engine's sha256, sealed with this device's key
    # engine, then its record, each through a rename: a reader never sees half of either
    write_atomically(output, engine_bytes)
    write_atomically(engine_meta_path(output), json.dumps(meta, indent=2, sort_keys=True).encode("utf-8"))
    if cache is not None:
        _save_timing_cache(config, cache_path, log)
    return meta


def timing_cache_path(base, trt_version, board=None, gpu=None):
    """The timing cache for this board and TensorRT version beside ``base``: 'edgerun.timing.cache' becomes
    'edgerun.timing.nvidia-jetson-nano-developer-kit.trt8.2.1.8.cache'. Tactic timings are only true for the GPU
    and TensorRT that measured them, so one file never serves two."""
    where = board or (gpu or {}).get("name") or "unknown-device"
    slug = re.sub(r"[^a-z0-9.]+", "-", where.lower()).strip("-") or "unknown-device"
    stem, ext = os.path.splitext(str(base))
    return "%s.%s.trt%s%s" % (stem, slug, trt_version, ext or ".cache")


def _use_timing_cache(config, path, log):
    """Load ``path`` into ``config``; a cache TensorRT refuses (damaged, or from another device or version: create
    returns None, set returns False) is set aside and the build starts from an empty one, and without one when
    even that fails. Returns the cache in use, or None."""
    blob = b""
    if os.path.isfile(path):
        with open(path, "rb") as fh:
            blob = fh.read()
    for attempt in ((blob, "'%s'" % path), (b"", "an empty timing cache")) if blob else ((b"", "an empty cache"),):
        data, what = attempt
        try:
            cache = config.create_timing_cache(data)
        except (RuntimeError, TypeError, ValueError) as exc:  # pybind11 turns TensorRT's errors into these
            cache = None
            log("note: TensorRT could not read %s (%s)" % (what, exc))
        if cache is not None and config.set_timing_cache(cache, False):
            return cache
        if data:
            log("note: TensorRT refused the timing cache '%s' (damaged, or made by another device or TensorRT): "
                "building without it; it is replaced after the build" % path)
    log("note: building without a timing cache (TensorRT would not create one)")
    return None


def _save_timing_cache(config, path, log):
    """Write the build's timing cache for the next build; a failure costs only the next build's time."""
    try:
        cache = config.get_timing_cache()
        write_atomically(path, bytes(cache.serialize()))
    except (OSError, IOError, RuntimeError, AttributeError) as exc:
        log("note: the timing cache could not be saved to '%s' (%s); the next build measures its tactics again"
            % (path, exc))


def check_engine(engine_path, bundle=None, trt=None, gpu=None, board=None, engine_bytes=None):
    """Refuse an engine made by another TensorRT version, on another device (compute capability and board
    model: Orin Nano and AGX Orin are both 8.7), or for another bundle; with ``engine_bytes`` (the bytes about to be
    deserialized), also one whose bytes differ from its record or whose record this device did not seal."""
    meta_path = engine_meta_path(engine_path)
    if not os.path.isfile(str(engine_path)):
        raise EngineMismatchError("engine '%s' does not exist: build it with `edgerun build`" % engine_path)
    if not os.path.isfile(meta_path):
        raise EngineMismatchError("engine '%s' has no %s beside it, so its origin is unknown: rebuild it with "
                                  "`edgerun build`" % (engine_path, os.path.basename(meta_path)))
    with open(meta_path) as fh:
        meta = json.load(fh)
    if trt is not None and parse_version(meta.get("tensorrt", "0")) != parse_version(trt.__version__):
        raise EngineMismatchError("engine '%s' was built with TensorRT %s, this device has %s: engines are not "
                                  "portable across TensorRT versions; rebuild it with `edgerun build`"
                                  % (engine_path, meta.get("tensorrt"), trt.__version__))
    if gpu and meta.get("compute_capability") and meta["compute_capability"] != gpu.get("compute_capability"):
        raise EngineMismatchError("engine '%s' was built on %s (compute capability %s), this is %s (%s): rebuild "
                                  "it with `edgerun build`" % (engine_path, meta.get("device"),
                                                               meta["compute_capability"], gpu.get("name"),
                                                               gpu.get("compute_capability")))
    board = board if board is not None else board_model()
    if meta.get("board") and not board and is_tegra():
        raise EngineMismatchError("engine '%s' was built on a %s, and this Jetson cannot see its own model (a "
                                  "container?): mount it (-v /proc/device-tree/model:%s:ro) or set $%s, so that an "
                                  "engine tuned to another board is never run here" % (engine_path, meta["board"],
                                                                                        BOARD_FILE, BOARD_ENV))
    if board and meta.get("board") and meta["board"] != board:
        raise EngineMismatchError("engine '%s' was built on a %s, this is a %s: an engine is tuned to its board's "
                                  "GPU and memory; rebuild it with `edgerun build`" % (engine_path, meta["board"], board))
    if engine_bytes is not None:
        check_sealed(meta, engine_bytes, engine_path, device_key())
    if bundle is not None and meta.get("bundle_sha256") != bundle_fingerprint(bundle):
        raise EngineMismatchError("engine '%s' was built from another bundle (or a changed one): rebuild it with "
                                  "`edgerun build`" % engine_path)
    return meta


# -------------------------------------------------------------------------------------------------- runner
class TrtRunner(Runner):
    """A serialized TensorRT engine: page-locked host buffers, one CUDA stream, async copies, CUDA-event timing."""

    name = "tensorrt"

    def __init__(self, engine_path, bundle=None, trt=None, cuda=None, gpu=None, board=None):
        Runner.__init__(self)
        self.engine_path = str(engine_path)
        self.bundle = bundle
        self._trt = trt
        self._cuda = cuda
        self.gpu = gpu
        self.board = board

    def _activate(self):
        cuda = self._cuda or import_cuda()
        trt = self._trt or import_tensorrt()
        self.cuda_context = cuda.Context.get_current()  # pushed around every call: any thread may infer
        self.free_at_start = cuda.mem_get_info()[0]  # device memory is measured from here (engine load on)
        self.rss_at_start = process_memory_mb()[0]
        if not os.path.isfile(str(self.engine_path)):
            raise EngineMismatchError("engine '%s' does not exist: build it with `edgerun build`" % self.engine_path)
        with open(self.engine_path, "rb") as fh:
            blob = fh.read()  # one read: the bytes checked against the record are the bytes deserialized
        self.meta = check_engine(self.engine_path, self.bundle, trt, self.gpu, self.board, engine_bytes=blob)
        self.api = select_api(trt)
        self.logger = make_logger(trt)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(blob)
        if self.engine is None:
            raise EngineMismatchError("TensorRT %s could not deserialize '%s' (%s): rebuild it with `edgerun build`"
                                      % (trt.__version__, self.engine_path,
                                         "; ".join(str(m) for _, m in self.logger.messages[-3:])))
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise RunnerError("TensorRT could not create an execution context for '%s' (out of device memory?): "
                              "close other GPU programs, or rebuild with a smaller --workspace-mb; TensorRT said: %s"
                              % (self.engine_path, "; ".join(str(m) for _, m in self.logger.messages[-3:]) or "-"))
        self.cuda = cuda
        self.stream = cuda.Stream()
        self.tensors = self.api.io_tensors(self.engine)
        self.host, self.device, self.shapes = {}, {}, {}
        self.events = [cuda.Event() for _ in range(4)]

    def input_names(self):
        return [t["name"] for t in self.tensors if t["is_input"]]

    def _buffers(self, feed):
        """(Re)allocate page-locked host and device buffers when the input shapes change."""
        shapes = dict((name, tuple(array.shape)) for name, array in feed.items())
        if shapes == self.shapes:
            return
        for tensor in self.tensors:
            if tensor["is_input"]:
                want, fixed = shapes[tensor["name"]], tensor["shape"]
                if len(want) != len(fixed) or any(f >= 0 and f != w for f, w in zip(fixed, want)):
                    raise RunnerError("input '%s' of engine '%s' is fixed at %s, the feed is %s: %s"
                                      % (tensor["name"], self.engine_path, fixed, want,
                                         "feed batch %d, or export with export.dynamic_batch and rebuild"
                                         % fixed[0] if fixed and fixed[0] >= 0 else "match the engine's shape"))
                if not self.api.set_input_shape(self.context, tensor, want):
                    raise RunnerError("engine '%s' refused input shape %s for '%s' (outside its optimization "
                                      "profile?)" % (self.engine_path, want, tensor["name"]))
        for tensor in self.tensors:
            shape = shapes[tensor["name"]] if tensor["is_input"] else self.api.output_shape(self.context, tensor)
            if any(d < 0 for d in shape):
                raise RunnerError("output '%s' has an unresolved shape %s" % (tensor["name"], shape))
            host = self.cuda.pagelocked_empty(int(np.prod(shape)), tensor["dtype"]).reshape(shape)
            self.host[tensor["name"]] = host
            self.device[tensor["name"]] = self.cuda.mem_alloc(host.nbytes)
        self.shapes = shapes

    def _infer(self, feed):
        self.cuda_context.push()  # this thread may not be the one that activated the runner
        try:
            return self._infer_current(feed)
        finally:
            self.cuda.Context.pop()

    def _infer_current(self, feed):
        self._buffers(feed)
        cuda, stream, ev = self.cuda, self.stream, self.events
        ev[0].record(stream)
        for tensor in self.tensors:
            if tensor["is_input"]:
                np.copyto(self.host[tensor["name"]], feed[tensor["name"]], casting="same_kind")
                cuda.memcpy_htod_async(self.device[tensor["name"]], self.host[tensor["name"]], stream)
        ev[1].record(stream)
        self.api.execute(self.context, self.tensors, self.device, stream)
        ev[2].record(stream)
        outputs = {}
        for tensor in self.tensors:
            if not tensor["is_input"]:
                cuda.memcpy_dtoh_async(self.host[tensor["name"]], self.device[tensor["name"]], stream)
        ev[3].record(stream)
        stream.synchronize()
        for tensor in self.tensors:
            if not tensor["is_input"]:
                outputs[tensor["name"]] = self.host[tensor["name"]].copy()
        self.last_timing = {"h2d": ev[1].time_since(ev[0]) / 1e3, "compute": ev[2].time_since(ev[1]) / 1e3,
                            "d2h": ev[3].time_since(ev[2]) / 1e3}
        return outputs

    def device_memory(self):
        """Device memory taken since activation (engine, context, I/O buffers): nvmap's per-process figure where
        readable (root), else the drop of cuda.mem_get_info()'s free memory, which on a Jetson's shared DRAM also
        moves with other processes."""
        from .device import nvmap_process_mb

        nvmap = nvmap_process_mb()
        if nvmap is not None:
            return {"mb": nvmap, "method": "nvmap per-process allocations (%s)" % "debugfs iovmm clients"}
        self.cuda_context.push()
        try:
            free_now = self.cuda.mem_get_info()[0]
        finally:
            self.cuda.Context.pop()
        drop = max(0, self.free_at_start - free_now) / float(1 << 20)
        shared = (self.gpu or {}).get("integrated")
        if not (is_tegra() if shared is None else shared):
            return {"mb": drop, "method": "cuda.mem_get_info free-memory drop from engine load to now"}
        # a Jetson's GPU shares DRAM with the CPU: its free figure is the OS's, so the drop also holds every host
        # byte this process took meanwhile (TensorRT's host-side set-up, frames, Python's heap), which VmHWM
        # already counts; take the process's own RSS growth over the same interval out
        rss_now = process_memory_mb()[0]
        growth = max(0.0, rss_now - self.rss_at_start) if rss_now is not None and self.rss_at_start is not None \
            else 0.0
        return {"mb": max(0.0, drop - growth),
                "method": "cuda.mem_get_info free-memory drop from engine load to now (%.0f MB), less this "
                          "process's RSS growth over the same interval (%.0f MB, host memory counted in VmHWM); "
                          "other processes move it too" % (drop, growth)}

    def _deactivate(self):
        self.context = None
        self.engine = None
        self.runtime = None
        self.host, self.device, self.shapes = {}, {}, {}
