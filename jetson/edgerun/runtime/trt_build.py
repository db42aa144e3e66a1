"""Build a TensorRT engine from a bundle: FP32/FP16, INT8 from the bundle's explicit-quantization model (or the
calibrator for older bundles on 8.x), DLA cores with GPU fallback, a timing cache per board and TensorRT version,
an out-of-memory retry with half the workspace; the engine and its sealed record written atomically.

TensorRT, pycuda and the device's facts are reached through ``edgerun.runtime.trt`` (one place for the version split,
and the one tests replace).
"""

import json
import os
import re
import time
from datetime import datetime

import numpy as np

from edgerun.errors import EngineBuildError
from edgerun.files import write_atomically
from edgerun.profiles import explicit_int8_variant
from edgerun.runtime import trt as _trt
from edgerun.runtime.engine_record import device_key, seal
from edgerun.spec import Spec


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
            chunk = np.ascontiguousarray(self.batches[self.index : self.index + batch_size], dtype=np.float32)
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
def check_int8_allowed(precision, target, gpu, force, builder=None):
    """INT8 where the GPU lacks a fast INT8 path (Nano sm_53, TX2 sm_62) is slower than FP16: refuse."""
    if precision != "int8":
        return
    fast = builder.platform_has_fast_int8 if builder is not None else bool(target.get("fast_int8"))
    if not fast and not force:
        where = (gpu or {}).get("name") or target.get("device") or "this GPU"
        cc = (gpu or {}).get("compute_capability") or target.get("compute_capability")
        raise EngineBuildError(
            "INT8 refused on %s (compute capability %s): it has no fast INT8 path, so INT8 "
            "runs slower than FP16 there; build --precision fp16, or pass --force to build "
            "INT8 anyway" % (where, cc)
        )


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
            problems.append(
                "node %s%s%s: %s" % (node, " '%s'" % name if name else "", " (%s)" % op if op else "", err.desc())
            )
        raise EngineBuildError(
            "TensorRT %s's ONNX parser rejected %s:\n  %s\nRe-export for this target "
            "(edgedistill export --target ...), which checks operators per TensorRT version"
            % (trt.__version__, os.path.basename(onnx_path), "\n  ".join(problems) or "no detail")
        )
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
        raise EngineBuildError(
            "--dla: %s has no Deep Learning Accelerator (Jetson Nano, TX2 and Orin Nano have none; "
            "Xavier NX, AGX Xavier, Orin NX and AGX Orin have DLA cores): build without --dla" % where
        )
    if not 0 <= int(dla_core) < cores:
        raise EngineBuildError(
            "--dla %s: %s has %d DLA core(s), numbered 0 to %d" % (dla_core, where, cores, cores - 1)
        )
    if precision == "fp32":
        raise EngineBuildError("--dla: the DLA runs FP16 and INT8, not FP32: add --precision fp16 or int8")


def check_dla_quantization(api, trt, dla_core, explicit_int8):
    """TensorRT 8.x's DLA does not run explicit quantization (Q/DQ layers): with GPU fallback the INT8 work would
    run on the GPU while the engine's record said DLA, without it the build fails. Refused before the build."""
    if dla_core is not None and explicit_int8 and api.generation < 10:
        raise EngineBuildError(
            "--dla with --precision int8: TensorRT %s's DLA does not run the bundle's explicit-quantization (Q/DQ) "
            "INT8 model (TensorRT 10 does); build --dla %s --precision fp16, or INT8 on the GPU (without --dla)"
            % (trt.__version__, dla_core)
        )


def dla_fallback_layers(network, config):
    """Names of the layers the DLA cannot run (they run on the GPU with --gpu-fallback)."""
    return [
        network.get_layer(i).name for i in range(network.num_layers) if not config.can_run_on_DLA(network.get_layer(i))
    ]


class BuildSpec(Spec):
    """What ``build_engine`` builds: ``precision`` (fp32, fp16, int8), the engine file ``output`` (default
    ``<name>.<precision>.engine`` in the working folder) and its workspace, the persistent ``timing_cache`` (keyed by
    board and TensorRT version), ``force`` (INT8 where it is slower or was rejected on the host), the ``target``'s
    facts (default: the bundle's), the ``gpu``'s properties, the ``board`` (default: this device's), and
    ``dla_core`` (a Deep Learning Accelerator core) with ``gpu_fallback`` for the layers it cannot run and
    ``dla_batch`` (the one batch a DLA engine of a dynamic-batch bundle runs; default the profile's opt)."""

    FIELDS = {
        "precision": "fp16",
        "output": None,
        "workspace_mb": 1024,
        "timing_cache": None,
        "force": False,
        "target": None,
        "gpu": None,
        "board": None,
        "dla_core": None,
        "gpu_fallback": False,
        "dla_batch": None,
    }


def _onnx_for(bundle, spec, api, trt):
    """(the ONNX file to build, whether it is the explicit-quantization INT8 model)."""
    if spec.precision != "int8":
        return bundle.model_path, False
    variant = explicit_int8_variant(bundle.manifest)
    if variant is not None:  # Q/DQ in the graph: no calibrator, on 8.2, 8.5 and 10.x alike
        if variant.get("status") == "rejected" and not spec.force:
            raise EngineBuildError(
                "the bundle's INT8 model was rejected on the host (%s drop %.2f points, over "
                "its gate); pass --force to build it anyway"
                % (variant.get("method", "INT8"), 100 * variant.get("drop", 0))
            )
        return bundle.path(variant["file"]), True
    if api.generation >= 10:
        raise EngineBuildError(
            "TensorRT %s builds INT8 from an explicit-quantization (QDQ) ONNX, which this "
            "bundle lacks: re-export it with this edgedistill (every bundle now carries one), "
            "or with a TensorRT 10 target (e.g. --target jetson-orin-nano-jp6)" % trt.__version__
        )
    return bundle.model_path, False


def dla_profile(dyn, spec):
    """The dynamic batch's profile for this build: the DLA runs static shapes only, so a DLA build's profile is
    min = opt = max (``spec.dla_batch``, default opt), as trtexec's --useDLACore needs."""
    if not dyn or spec.dla_core is None:
        return dyn
    batch = int(spec.dla_batch) if spec.dla_batch is not None else int(dyn["opt"])
    if not int(dyn["min"]) <= batch <= int(dyn["max"]):
        raise EngineBuildError(
            "--dla-batch %d: the bundle's dynamic batch runs %d to %d" % (batch, dyn["min"], dyn["max"])
        )
    return {"min": batch, "opt": batch, "max": batch}


class _Build(object):
    """One engine build's TensorRT objects and choices, shared by its attempts."""

    def __init__(self, bundle, spec, trt, cuda, log):
        self.bundle, self.spec, self.trt, self.cuda, self.log = bundle, spec, trt, cuda, log
        self.api = _trt.select_api(trt)
        self.logger = _trt.make_logger(trt)
        self.builder = trt.Builder(self.logger)

    def config(self, network, workspace, explicit_int8, output):
        """A builder config for one attempt: workspace, precision flags, the dynamic batch's profile, DLA, INT8
        (Q/DQ, or the calibrator of an older bundle). Returns (config, the layers the DLA leaves to the GPU)."""
        trt, spec, builder, manifest = self.trt, self.spec, self.builder, self.bundle.manifest
        config = builder.create_builder_config()
        self.api.set_workspace(config, workspace)
        if spec.precision in ("fp16", "int8"):
            if not builder.platform_has_fast_fp16:
                self.log("note: this GPU has no fast FP16 path; FP16 layers may not be faster than FP32")
            config.set_flag(trt.BuilderFlag.FP16)
        dyn = dla_profile(manifest.model.get("dynamic_batch"), spec)
        profile = None
        if dyn:
            profile = builder.create_optimization_profile()
            rest = tuple(manifest.input_shape[1:])
            profile.set_shape(manifest.input_name, (dyn["min"],) + rest, (dyn["opt"],) + rest, (dyn["max"],) + rest)
            if config.add_optimization_profile(profile) < 0:  # TensorRT returns -1 for a profile it refuses
                raise EngineBuildError(
                    "TensorRT refused the optimization profile of the dynamic batch (min %d, opt %d, "
                    "max %d for '%s'): re-export with min <= opt <= max"
                    % (dyn["min"], dyn["opt"], dyn["max"], manifest.input_name)
                )
        gpu_layers = self._dla(network, config) if spec.dla_core is not None else None
        if spec.precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
            if not explicit_int8:
                batch = dyn["opt"] if dyn else manifest.input_shape[0]  # calibration runs at the profile's opt
                config.int8_calibrator = make_entropy_calibrator(
                    trt,
                    self.cuda,
                    self.bundle.calibration(),
                    calibration_cache_path(output, _trt.bundle_fingerprint(self.bundle), batch, dyn),
                    batch,
                )
                if profile is not None and not config.set_calibration_profile(profile):
                    raise EngineBuildError("TensorRT refused the calibration profile of the dynamic batch")
        return config, gpu_layers

    def _dla(self, network, config):
        config.default_device_type = self.trt.DeviceType.DLA
        config.DLA_core = int(self.spec.dla_core)
        gpu_layers = dla_fallback_layers(network, config)
        if gpu_layers and not self.spec.gpu_fallback:
            raise EngineBuildError(
                "%d layer(s) cannot run on the DLA (first: %s): add --gpu-fallback to run them "
                "on the GPU" % (len(gpu_layers), ", ".join(gpu_layers[:5]))
            )
        if self.spec.gpu_fallback:
            config.set_flag(self.trt.BuilderFlag.GPU_FALLBACK)
        return gpu_layers

    def serialize(self, network, config):
        """The serialized engine, or None with TensorRT's messages in ``self.logger``."""
        del self.logger.messages[:]
        try:
            return self.builder.build_serialized_network(network, config)
        except MemoryError:
            self.logger.messages.append((0, "out of memory (MemoryError)"))
            return None

    def failed(self, workspace):
        detail = "; ".join(str(m) for s, m in self.logger.messages[-5:]) or "no detail from TensorRT"
        if _trt._is_oom(self.logger.messages):
            return EngineBuildError(
                "engine build ran out of memory twice (workspace down to %d MB): close other "
                "programs, add swap (e.g. a 4 GB swap file on the Nano: sudo fallocate -l 4G "
                "/swapfile && sudo mkswap /swapfile && sudo swapon /swapfile) or use a smaller "
                "--workspace-mb. TensorRT said: %s" % (workspace >> 20, detail)
            )
        return EngineBuildError("TensorRT could not build the engine: %s" % detail)


def build_engine(bundle, spec, trt=None, cuda=None, log=print):
    """Build and serialize an engine for ``bundle`` as ``spec`` (a :class:`BuildSpec`) says; write the engine and
    its sealed record ``<engine>.json``. ``trt``/``cuda``: the modules (tests pass fakes); ``log``: notes.

    INT8 engines come from the bundle's explicit-quantization model (Q/DQ, no calibrator) when it has one; older
    bundles are calibrated from ``calib.npy`` (TensorRT 8.x). ``spec.dla_core`` builds for that Deep Learning
    Accelerator core; layers it cannot run are refused, or run on the GPU with ``spec.gpu_fallback`` (listed in the
    engine's record).

    On an out-of-memory build the workspace is halved and the build tried once more; a second failure
    says so and points at swap. Returns the engine's metadata dictionary.
    """
    if spec.precision not in ("fp32", "fp16", "int8"):
        raise EngineBuildError("precision must be fp32, fp16 or int8, not %r" % (spec.precision,))
    cuda = cuda or _trt.import_cuda()  # the primary context is current before TensorRT touches CUDA
    trt = trt or _trt.import_tensorrt()
    build = _Build(bundle, spec, trt, cuda, log)
    manifest = bundle.manifest
    target = spec.target or manifest.data.get("target_facts") or {}
    check_int8_allowed(spec.precision, target, spec.gpu, spec.force, build.builder)
    onnx_file, explicit_int8 = _onnx_for(bundle, spec, build.api, trt)
    check_dla(build.builder, target, spec.dla_core, spec.precision)
    check_dla_quantization(build.api, trt, spec.dla_core, explicit_int8)
    if explicit_int8 and not build.builder.platform_has_fast_int8:
        where = (spec.gpu or {}).get("name") or target.get("device") or "this GPU"
        raise EngineBuildError(
            "--force INT8 cannot work on %s: the bundle's INT8 model is explicit quantization (Q/DQ), which TensorRT "
            "builds only with INT8 kernels, and this GPU has none (no fast INT8: Nano sm_53, TX2 sm_62). Build "
            "--precision fp16 (faster there anyway)" % where
        )
    if spec.dla_batch is not None and spec.dla_core is None:
        raise EngineBuildError("--dla-batch is for DLA builds: add --dla N")
    network, _parser = _parse_onnx(trt, build.api, build.builder, build.logger, onnx_file)

    output = spec.output or os.path.join(os.getcwd(), "%s.%s.engine" % (manifest.data["name"], spec.precision))
    board = spec.board if spec.board is not None else _trt.board_model()
    if not board:
        if _trt.is_tegra():  # a container without the board mount: a record naming no board runs on any Jetson
            raise EngineBuildError(
                "this Jetson cannot see its own model (a container without the board mount?): the engine's record "
                "must name the board it is tuned to (Orin Nano and AGX Orin share compute capability 8.7). Run the "
                "container with -v /proc/device-tree/model:%s:ro, or set $%s" % (_trt.BOARD_FILE, _trt.BOARD_ENV)
            )
        log("note: not a Jetson: the engine's record names no board, only the GPU (%s)" % (spec.gpu or {}).get("name"))
    cache_path = timing_cache_path(spec.timing_cache, trt.__version__, board, spec.gpu) if spec.timing_cache else None
    workspace = int(spec.workspace_mb) << 20
    attempt = 0
    while True:
        attempt += 1
        config, gpu_layers = build.config(network, workspace, explicit_int8, output)
        cache = _use_timing_cache(config, cache_path, log) if cache_path else None
        started = time.time()
        serialized = build.serialize(network, config)
        if serialized is not None:
            break
        if _trt._is_oom(build.logger.messages) and attempt == 1 and workspace > (16 << 20):
            workspace //= 2
            log("engine build ran out of memory; retrying with a %d MB workspace" % (workspace >> 20))
            continue
        raise build.failed(workspace)
    build_seconds = time.time() - started
    engine_bytes = bytes(serialized)
    key = device_key(create=True)  # before anything is written: a device that cannot seal builds nothing
    meta = {
        "engine": os.path.basename(output),
        "tensorrt": trt.__version__,
        "device": (spec.gpu or {}).get("name"),
        "compute_capability": (spec.gpu or {}).get("compute_capability"),
        "l4t": _trt.l4t_release(),
        "board": board,
        "precision": spec.precision,
        "onnx": os.path.basename(onnx_file),
        "explicit_quantization": explicit_int8,
        "dla": None
        if spec.dla_core is None
        else _dla_record(spec, gpu_layers, manifest.model.get("dynamic_batch"), manifest.input_shape[0]),
        "bundle_sha256": _trt.bundle_fingerprint(bundle),
        "bundle_name": manifest.data["name"],
        "workspace_mb": workspace >> 20,
        "build_seconds": round(build_seconds, 2),
        "created": datetime.utcnow().replace(microsecond=0).isoformat() + "Z",
    }
    meta = seal(meta, engine_bytes, key)  # the engine's sha256, sealed with this device's key
    # engine, then its record, each through a rename: a reader never sees half of either
    write_atomically(output, engine_bytes)
    write_atomically(_trt.engine_meta_path(output), json.dumps(meta, indent=2, sort_keys=True).encode("utf-8"))
    if cache is not None:
        _save_timing_cache(config, cache_path, log)
    return meta


def _dla_record(spec, gpu_layers, dyn, fixed):
    """What runs where in a DLA engine: its core, the layers on the GPU (GPU fallback), the one batch it runs."""
    return {
        "core": int(spec.dla_core),
        "gpu_fallback": bool(spec.gpu_fallback),
        "gpu_layers": gpu_layers,
        "batch": dla_profile(dyn, spec)["opt"] if dyn else int(fixed),
    }


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
            log(
                "note: TensorRT refused the timing cache '%s' (damaged, or made by another device or TensorRT): "
                "building without it; it is replaced after the build" % path
            )
    log("note: building without a timing cache (TensorRT would not create one)")
    return None


def _save_timing_cache(config, path, log):
    """Write the build's timing cache for the next build; a failure costs only the next build's time."""
    try:
        cache = config.get_timing_cache()
        write_atomically(path, bytes(cache.serialize()))
    except (OSError, IOError, RuntimeError, AttributeError) as exc:
        log(
            "note: the timing cache could not be saved to '%s' (%s); the next build measures its tactics again"
            % (path, exc)
        )
