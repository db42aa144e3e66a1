"""Fakes of the TensorRT 8.2 / 8.5 / 10.x Python APIs and of pycuda.driver, for control-flow tests.

They are held to the real APIs, not kinder: each generation has only its own members (8.2 lacks
``MemoryPoolType`` and ``TensorIOMode``; a 10.x config lacks ``max_workspace_size``), shape setters return
False for a shape outside the engine's fixed dimensions or profile, executes return their boolean, device
buffers have a fixed size (a larger copy raises, as it would corrupt memory on the device), every CUDA call
needs a current context on the calling thread, calibration reads the cache and the batch size first, 8.5's
``nptype`` fails under numpy >= 1.24 (NVIDIA/TensorRT#2557), and a dynamic-shape INT8 calibration without a
calibration profile fails as in TensorRT 8. Outputs are real: the parsed ONNX model runs in ONNX Runtime.
The 10.x surface is checked against NVIDIA's published type stubs (``tensorrt-stubs``) in test_trt.py: every
class here names its stub class in ``_stub``.
"""

import json
import mmap
import threading
import time
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort

from edgerun.profiles import parse_version

TIMING_CACHE_MAGIC = b"FAKE-TIMING-CACHE:"


class FakeLogicError(RuntimeError):
    """pycuda.driver.LogicError: e.g. 'invalid device context' when no context is current on the thread."""


# ------------------------------------------------------------------------------------------- pycuda.driver
def _rss_bytes():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class FakeCuda:
    """pycuda.driver after ``import pycuda.autoprimaryctx``: the primary context is current on the importing
    thread only; any other thread must push it first."""

    def __init__(self, total_mb=4096, shares_host_memory=False):
        """``shares_host_memory``: a Jetson's integrated GPU, whose cuMemGetInfo free figure is the OS's free memory,
        so host allocations by this process (its RSS growth) lower it as device allocations do."""
        self.shares_host_memory = shares_host_memory
        self.rss_at_start = _rss_bytes()
        self.memory = {}
        self.next_ptr = 0x1000
        self.calls = []
        self.total = total_mb << 20
        self._local = threading.local()
        self.primary = FakeCuda._Context(self)
        self._local.stack = [self.primary]
        cuda = self

        class Context:
            @staticmethod
            def get_current():
                stack = cuda._stack()
                return stack[-1] if stack else None

            @staticmethod
            def pop():
                cuda.calls.append("ctx.pop")
                cuda._stack().pop()

        self.Context = Context

    class _Context:
        def __init__(self, cuda):
            self.cuda = cuda

        def push(self):
            self.cuda.calls.append("ctx.push")
            self.cuda._stack().append(self)

    def _stack(self):
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        return self._local.stack

    def _check(self, what):
        if not self._stack():
            raise FakeLogicError("%s failed: invalid device context (no context is current on this thread)" % what)

    class _Alloc:
        def __init__(self, ptr):
            self.ptr = ptr

        def __int__(self):
            return self.ptr

    def mem_alloc(self, nbytes):
        self._check("cuMemAlloc")
        ptr = self.next_ptr
        self.next_ptr += int(nbytes) + 256
        # anonymous pages, resident only once written: like device memory on a Jetson (nvmap), an allocation is
        # not in this process's RSS, so the shared-memory arithmetic of mem_get_info stays true
        self.memory[ptr] = mmap.mmap(-1, max(1, int(nbytes)))
        return FakeCuda._Alloc(ptr)

    def mem_get_info(self):
        self._check("cuMemGetInfo")
        used = sum(len(b) for b in self.memory.values())  # what the driver reserved, resident or not
        if self.shares_host_memory:
            used += max(0, _rss_bytes() - self.rss_at_start)
        return self.total - used, self.total

    def pagelocked_empty(self, count, dtype):
        self._check("cuMemHostAlloc")
        self.calls.append("pagelocked_empty")
        return np.empty(count, dtype=dtype)

    def _copy_in(self, dev, host):
        data = np.ascontiguousarray(host).tobytes()
        buf = self.memory[int(dev)]
        if len(data) > len(buf):
            raise FakeLogicError("copy of %d bytes into a %d-byte device buffer: past its end" % (len(data), len(buf)))
        buf[: len(data)] = data

    def memcpy_htod_async(self, dev, host, stream):
        self._check("cuMemcpyHtoDAsync")
        self.calls.append("memcpy_htod_async")
        self._copy_in(dev, host)

    def memcpy_htod(self, dev, host):
        self._check("cuMemcpyHtoD")
        self._copy_in(dev, host)

    def memcpy_dtoh_async(self, host, dev, stream):
        self._check("cuMemcpyDtoHAsync")
        self.calls.append("memcpy_dtoh_async")
        buf = self.memory[int(dev)]
        if host.nbytes > len(buf):
            raise FakeLogicError("copy of %d bytes out of a %d-byte device buffer" % (host.nbytes, len(buf)))
        np.copyto(host, np.frombuffer(bytes(buf[: host.nbytes]), dtype=host.dtype).reshape(host.shape))

    class _Stream:
        handle = 42

        def synchronize(self):
            pass

    class _Event:
        def record(self, stream=None):
            self.t = time.perf_counter()

        def time_since(self, other):
            return (self.t - other.t) * 1e3

    def Stream(self):  # noqa: N802  (pycuda's class name)
        self._check("cuStreamCreate")
        return FakeCuda._Stream()

    def Event(self):  # noqa: N802
        self._check("cuEventCreate")
        return FakeCuda._Event()


# ------------------------------------------------------------------------------------------------- tensorrt
class _Severity:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = 0, 1, 2, 3, 4


class _ILogger:
    _stub = "ILogger"
    Severity = _Severity

    def __init__(self):
        pass


class _Calibrator:
    _stub = "IInt8EntropyCalibrator2"

    def __init__(self):
        pass


class _EnumMember:
    def __init__(self, owner, name, value):
        self.name, self.value, self._owner = name, value, owner

    def __int__(self):
        return self.value

    def __repr__(self):
        return "<%s.%s: %d>" % (self._owner, self.name, self.value)


def _enum(owner, names):
    return SimpleNamespace(**dict((n, _EnumMember(owner, n, i)) for i, n in enumerate(names)))


# ONNX operators whose TensorRT layers the DLA runs (TensorRT's "DLA Supported Layers": convolution, activations
# ReLU/Sigmoid/clipped ReLU, pooling, scale, element-wise, concatenation; Q/DQ of explicit INT8). Anything else
# (HardSigmoid, GlobalAveragePool's reduce, Flatten's shuffle, Gemm) falls back to the GPU or fails.
DLA_OPS = {
    "Conv",
    "Relu",
    "Clip",
    "Sigmoid",
    "MaxPool",
    "AveragePool",
    "BatchNormalization",
    "Add",
    "Mul",
    "Sub",
    "Concat",
    "QuantizeLinear",
    "DequantizeLinear",
}


def make_fake_trt(
    version, fast_int8=True, fast_fp16=True, oom_times=0, parse_error=None, cuda=None, context_fails=False, dla_cores=0
):
    """A module-like namespace imitating ``tensorrt`` at ``version`` (its calls in ``.calls``); ``dla_cores``: the
    board's Deep Learning Accelerators (0 on Nano, TX2, Orin Nano)."""
    v = parse_version(version)
    # IParserError.nodeName()/nodeOperator() came with TensorRT 10.0 (8.6's parser error has node() only)
    gen10, has_pool, has_iomode, has_node_name = v >= (10,), v >= (8, 4), v >= (8, 5), v >= (10,)
    calls = []
    state = {"oom_left": oom_times, "workspaces": [], "calibration": []}
    dtype_names = (
        ["FLOAT", "HALF", "INT8", "INT32", "BOOL"]
        + (["UINT8"] if v >= (8, 5) else [])
        + (["FP8", "BF16", "INT64", "INT4"] if gen10 else [])
    )
    DataType = _enum("DataType", dtype_names)
    TensorIOMode = _enum("TensorIOMode", ["NONE", "INPUT", "OUTPUT"])
    MemoryPoolType = _enum(
        "MemoryPoolType", ["WORKSPACE", "DLA_MANAGED_SRAM", "DLA_LOCAL_DRAM", "DLA_GLOBAL_DRAM", "TACTIC_DRAM"]
    )
    BuilderFlag = _enum("BuilderFlag", ["FP16", "INT8", "GPU_FALLBACK"])
    DeviceType = _enum("DeviceType", ["GPU", "DLA"])
    NetworkDefinitionCreationFlag = _enum("NetworkDefinitionCreationFlag", ["EXPLICIT_BATCH"])

    def need_cuda(what):
        if cuda is not None:
            cuda._check(what)

    class Profile:
        _stub = "IOptimizationProfile"

        def __init__(self):
            self.shapes = {}

        def set_shape(self, input, min, opt, max):  # noqa: A002  (TensorRT's parameter names)
            self.shapes[input] = (tuple(min), tuple(opt), tuple(max))

        def _valid(self):
            """TensorRT's check: shapes set, and min <= opt <= max in every dimension."""
            return bool(self.shapes) and all(
                all(a <= b <= c for a, b, c in zip(*shapes)) for shapes in self.shapes.values()
            )

    class Config:
        _stub = "IBuilderConfig"

        def __init__(self):
            self.flags = set()
            self.int8_calibrator = None
            self.profiles = []
            self.calibration_profile = None
            self._cache = None
            self.workspace = None
            self.default_device_type = DeviceType.GPU
            self.DLA_core = -1

        def set_flag(self, flag):
            self.flags.add(flag.name)

        def can_run_on_DLA(self, layer):  # noqa: N802  (TensorRT's name)
            if layer.type in ("QuantizeLinear", "DequantizeLinear") and not gen10:
                return False  # TensorRT 8.x's DLA has no explicit quantization: Q/DQ fall back to the GPU
            return layer.type in DLA_OPS

        def add_optimization_profile(self, profile):
            if not profile._valid():
                return -1  # TensorRT's answer to an invalid profile: the index -1, no exception
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def set_calibration_profile(self, profile):
            calls.append("set_calibration_profile")
            if profile is None or not profile._valid():
                return False
            self.calibration_profile = profile
            return True

        def create_timing_cache(self, serialized_timing_cache):
            """A cache this build can read (empty, or written by the same TensorRT version) or None, as TensorRT
            returns for a damaged blob; one from another version is read, and refused by set_timing_cache."""
            calls.append("create_timing_cache")
            blob = bytes(serialized_timing_cache)
            if blob and not blob.startswith(TIMING_CACHE_MAGIC):
                return None
            made_by = blob[len(TIMING_CACHE_MAGIC) :].decode("ascii", "replace") if blob else version
            return SimpleNamespace(made_by=made_by, serialize=lambda: TIMING_CACHE_MAGIC + version.encode("ascii"))

        def set_timing_cache(self, cache, ignore_mismatch):
            calls.append("set_timing_cache")
            if cache.made_by != version and not ignore_mismatch:
                return False  # a cache from another TensorRT version or device
            self._cache = cache
            return True

        def get_timing_cache(self):
            return self._cache

    if has_pool:

        def set_memory_pool_limit(self, pool, pool_size):
            assert pool is MemoryPoolType.WORKSPACE
            calls.append(("set_memory_pool_limit", pool_size))
            self.workspace = pool_size

        Config.set_memory_pool_limit = set_memory_pool_limit
    if not gen10:  # removed in 10.0

        def _set_ws(self, nbytes):
            calls.append(("max_workspace_size", nbytes))
            self.workspace = nbytes

        Config.max_workspace_size = property(lambda self: self.workspace, _set_ws)

    class Layer:
        _stub = "ILayer"

        def __init__(self, node):
            self.name, self.type = node.name, node.op_type

    class Network:
        _stub = "INetworkDefinition"

        def __init__(self, flags):
            self.flags = flags
            self.onnx = None

        @property
        def _layers(self):
            import onnx

            return [Layer(n) for n in onnx.load_from_string(self.onnx).graph.node]

        @property
        def num_layers(self):
            return len(self._layers)

        def get_layer(self, index):
            return self._layers[index]

    class ParserError:
        _stub = "ParserError"

        def __init__(self, node, desc, name="", op=""):
            self._node, self._desc, self._name, self._op = node, desc, name, op

        def node(self):
            return self._node

        def desc(self):
            return self._desc

    if has_node_name:
        ParserError.node_name = lambda self: self._name
        ParserError.node_operator = lambda self: self._op

    class Parser:
        _stub = "OnnxParser"

        def __init__(self, network, logger):
            self.network = network
            self.errors = []

        def parse(self, model, path=None):
            calls.append("parse")
            if parse_error:
                self.errors = [ParserError(*parse_error)]
                return False
            self.network.onnx = model
            return True

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, index):
            return self.errors[index]

    class Builder:
        _stub = "Builder"
        platform_has_fast_int8 = fast_int8
        platform_has_fast_fp16 = fast_fp16

        def __init__(self, logger):
            need_cuda("Builder")  # TensorRT initialises CUDA here: the context must exist already
            self.logger = logger

        def create_network(self, flags=0):
            calls.append(("create_network", flags))
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        @property
        def num_DLA_cores(self):  # noqa: N802  (TensorRT's name)
            return dla_cores

        def build_serialized_network(self, network, config):
            calls.append(("build", sorted(config.flags), config.workspace))
            if config.default_device_type is DeviceType.DLA:
                calls.append(("dla", config.DLA_core))
                if not 0 <= config.DLA_core < dla_cores:
                    self.logger.log(_Severity.ERROR, "Cannot create DLA engine, %d not available" % config.DLA_core)
                    return None
                falls = [layer.name for layer in network._layers if not config.can_run_on_DLA(layer)]
                if falls and "GPU_FALLBACK" not in config.flags:
                    self.logger.log(_Severity.ERROR, "%s: layer cannot run on DLA and GPU fallback is off" % falls[0])
                    return None
                for lo, opt, hi in (shapes for p in config.profiles for shapes in p.shapes.values()):
                    if not lo == opt == hi:
                        self.logger.log(_Severity.ERROR, "DLA only supports static shapes: min, opt and max differ")
                        return None
            qdq = [layer.name for layer in network._layers if layer.type in ("QuantizeLinear", "DequantizeLinear")]
            if qdq and not fast_int8:
                self.logger.log(_Severity.ERROR, "%s: no INT8 implementation on this platform" % qdq[0])
                return None
            state["workspaces"].append(config.workspace)
            if state["oom_left"] > 0:
                state["oom_left"] -= 1
                self.logger.log(_Severity.ERROR, "Requested amount of GPU memory could not be allocated: out of memory")
                return None
            profile = {}
            if config.profiles:
                ((lo, opt, hi),) = config.profiles[0].shapes.values()
                profile = {"min": lo[0], "opt": opt[0], "max": hi[0]}
            if config.default_device_type is DeviceType.DLA:
                profile["dla_core"] = config.DLA_core
            calibrator = config.int8_calibrator
            if "INT8" in config.flags and calibrator is not None:
                if profile and profile["min"] != profile["max"] and config.calibration_profile is None:
                    self.logger.log(
                        _Severity.ERROR,
                        "Calibration profile must be provided when calibrating a network with dynamic shapes",
                    )
                    return None
                need_cuda("calibration")
                cached = calibrator.read_calibration_cache()
                state["calibration"].append("cache hit" if cached else "calibrated")
                if not cached:
                    calls.append("calibrate")
                    state["calibration_batch"] = calibrator.get_batch_size()
                    while calibrator.get_batch(["input"]) is not None:
                        pass
                    calibrator.write_calibration_cache(b"CALIBCACHE")
            return b"FAKEENGINE" + json.dumps(profile).encode() + b"\n" + network.onnx

    class Engine:
        _stub = "ICudaEngine"

        def __init__(self, onnx_bytes, profile):
            self.session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
            self.profile = profile
            self.io = [(i.name, True, i.shape) for i in self.session.get_inputs()] + [
                (o.name, False, o.shape) for o in self.session.get_outputs()
            ]

        def create_execution_context(self):
            need_cuda("create_execution_context")
            return None if context_fails else Context(self)

        def _dims(self, name):
            return [d if isinstance(d, int) else -1 for d in dict((n, s) for n, _, s in self.io)[name]]

    if gen10:
        Engine.num_io_tensors = property(lambda self: len(self.io))
        Engine.get_tensor_name = lambda self, index: self.io[index][0]
        Engine.get_tensor_mode = lambda self, name: (
            TensorIOMode.INPUT if dict((n, i) for n, i, _ in self.io)[name] else TensorIOMode.OUTPUT
        )
        Engine.get_tensor_shape = lambda self, name: self._dims(name)
        Engine.get_tensor_dtype = lambda self, name: DataType.FLOAT
    else:
        Engine.num_bindings = property(lambda self: len(self.io))
        Engine.get_binding_name = lambda self, index: self.io[index][0]
        Engine.binding_is_input = lambda self, index: self.io[index][1]
        Engine.get_binding_shape = lambda self, index: self._dims(self.io[index][0])
        Engine.get_binding_dtype = lambda self, index: DataType.FLOAT

    class Context:
        _stub = "IExecutionContext"

        def __init__(self, engine):
            self.engine = engine
            self.shapes = {}
            self.addresses = {}

        def _accept(self, name, shape):
            """TensorRT's rule: the rank and every fixed dimension must match, a free one lie in the profile."""
            dims, shape = self.engine._dims(name), tuple(shape)
            if len(dims) != len(shape) or any(d >= 0 and d != s for d, s in zip(dims, shape)):
                return False
            p = self.engine.profile
            if p and not p["min"] <= shape[0] <= p["max"]:
                return False
            self.shapes[name] = shape
            return True

        def _nbytes(self, name):
            return int(np.prod(self._shape(name))) * 4

        def _shape(self, name):
            if name in self.shapes:
                return self.shapes[name]
            batch = list(self.shapes.values())[0][0]
            dims = self.engine._dims(name)
            return tuple([batch if dims[0] < 0 else dims[0]] + dims[1:])

        def _run(self, addresses):
            need_cuda("enqueue")
            inputs = [n for n, is_in, _ in self.engine.io if is_in]
            if any(n not in self.shapes for n in inputs) or any(n not in addresses for n, _, _ in self.engine.io):
                return False  # TensorRT: "not all shapes are specified" / an address is missing
            for name, _, _ in self.engine.io:
                if len(cuda.memory[addresses[name]]) < self._nbytes(name):
                    raise FakeLogicError(
                        "tensor '%s' needs %d bytes, its buffer has %d"
                        % (name, self._nbytes(name), len(cuda.memory[addresses[name]]))
                    )
            name = inputs[0]
            x = np.frombuffer(bytes(cuda.memory[addresses[name]][: self._nbytes(name)]), dtype=np.float32).reshape(
                self.shapes[name]
            )
            result = self.engine.session.run(None, {name: x})
            for (out, _is_in, _), value in zip([e for e in self.engine.io if not e[1]], result):
                data = np.ascontiguousarray(value, dtype=np.float32).tobytes()
                cuda.memory[addresses[out]][: len(data)] = data
            return True

    if gen10:

        def set_input_shape(self, name, shape):
            calls.append("set_input_shape")
            return self._accept(name, shape)

        def get_tensor_shape(self, name):
            return self._shape(name)

        def set_tensor_address(self, name, memory):
            self.addresses[name] = memory
            return True

        def execute_async_v3(self, stream_handle):
            calls.append("execute_async_v3")
            return self._run(self.addresses)

        Context.set_input_shape, Context.get_tensor_shape = set_input_shape, get_tensor_shape
        Context.set_tensor_address, Context.execute_async_v3 = set_tensor_address, execute_async_v3
    else:

        def set_binding_shape(self, binding, shape):
            calls.append("set_binding_shape")
            return self._accept(self.engine.io[binding][0], shape)

        def get_binding_shape(self, binding):
            return self._shape(self.engine.io[binding][0])

        def execute_async_v2(self, bindings, stream_handle):
            calls.append("execute_async_v2")
            return self._run(dict((name, ptr) for (name, _, _), ptr in zip(self.engine.io, bindings)))

        Context.set_binding_shape, Context.get_binding_shape = set_binding_shape, get_binding_shape
        Context.execute_async_v2 = execute_async_v2

    class Runtime:
        _stub = "Runtime"

        def __init__(self, logger):
            self.logger = logger
            self.DLA_core = -1  # IRuntime::setDLACore: the core a DLA engine is deserialized onto

        def deserialize_cuda_engine(self, serialized_engine):
            calls.append("deserialize")
            need_cuda("deserialize_cuda_engine")
            if not serialized_engine.startswith(b"FAKEENGINE"):
                return None
            header, _, onnx_bytes = serialized_engine[len(b"FAKEENGINE") :].partition(b"\n")
            profile = json.loads(header.decode())
            core = profile.pop("dla_core", None)
            if core is not None:
                calls.append(("runtime_dla_core", self.DLA_core))
                if self.DLA_core != core:  # stricter than the board, which would run it on another core
                    self.logger.log(
                        _Severity.ERROR, "engine built for DLA core %d, runtime DLA core %d" % (core, self.DLA_core)
                    )
                    return None
            return Engine(onnx_bytes, profile)

    def nptype(trt_type):
        if v[:2] == (8, 5) and parse_version(np.__version__) >= (1, 24):
            raise AttributeError("module 'numpy' has no attribute 'bool'")  # tensorrt 8.5's own nptype
        return np.dtype(
            {"FLOAT": "float32", "HALF": "float16", "INT8": "int8", "INT32": "int32", "BOOL": "bool"}[trt_type.name]
        )

    members = dict(
        __version__=version,
        ILogger=_ILogger,
        IInt8EntropyCalibrator2=_Calibrator,
        Builder=Builder,
        OnnxParser=Parser,
        Runtime=Runtime,
        nptype=nptype,
        DataType=DataType,
        BuilderFlag=BuilderFlag,
        NetworkDefinitionCreationFlag=NetworkDefinitionCreationFlag,
        DeviceType=DeviceType,
        calls=calls,
        state=state,
        classes=dict(
            Config=Config,
            Network=Network,
            ParserError=ParserError,
            Engine=Engine,
            Context=Context,
            Profile=Profile,
            Layer=Layer,
        ),
    )
    if has_pool:
        members["MemoryPoolType"] = MemoryPoolType
    if has_iomode:
        members["TensorIOMode"] = TensorIOMode
    return SimpleNamespace(**members)
