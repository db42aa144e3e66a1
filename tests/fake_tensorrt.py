"""Small fakes of the TensorRT 8.2 / 10.x Python APIs and of pycuda.driver, for control-flow tests.

Each fake exposes only the methods of its generation (a TensorRT 8 engine has no ``execute_async_v3``, a
TensorRT 10 config has no ``max_workspace_size``), records the calls made, and computes real outputs by
running the parsed ONNX model through ONNX Runtime, so a runner's results can be checked for value.
"""
import time
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort

from edgerun.profiles import parse_version


# ------------------------------------------------------------------------------------------- pycuda.driver
class FakeCuda:
    def __init__(self):
        self.memory = {}
        self.next_ptr = 0x1000
        self.calls = []

    class _Alloc:
        def __init__(self, ptr):
            self.ptr = ptr

        def __int__(self):
            return self.ptr

    def mem_alloc(self, nbytes):
        ptr = self.next_ptr
        self.next_ptr += int(nbytes) + 256
        self.memory[ptr] = bytearray(int(nbytes))
        return FakeCuda._Alloc(ptr)

    def pagelocked_empty(self, count, dtype):
        self.calls.append("pagelocked_empty")
        return np.empty(count, dtype=dtype)

    def memcpy_htod_async(self, dev, host, stream):
        self.calls.append("memcpy_htod_async")
        self.memory[int(dev)][:] = np.ascontiguousarray(host).tobytes()

    def memcpy_htod(self, dev, host):
        self.memory[int(dev)][:] = np.ascontiguousarray(host).tobytes()

    def memcpy_dtoh_async(self, host, dev, stream):
        self.calls.append("memcpy_dtoh_async")
        flat = np.frombuffer(bytes(self.memory[int(dev)]), dtype=host.dtype).reshape(host.shape)
        np.copyto(host, flat)

    class Stream:
        handle = 42

        def synchronize(self):
            pass

    class Event:
        def record(self, stream=None):
            self.t = time.perf_counter()

        def time_since(self, other):
            return (self.t - other.t) * 1e3


# ------------------------------------------------------------------------------------------------- tensorrt
class _Severity:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = 0, 1, 2, 3, 4


class _ILogger:
    Severity = _Severity

    def __init__(self):
        pass


class _Calibrator:
    def __init__(self):
        pass


class FakeError:
    def __init__(self, node, desc, name="", op=""):
        self._node, self._desc, self._name, self._op = node, desc, name, op

    def node(self):
        return self._node

    def desc(self):
        return self._desc


def make_fake_trt(version, fast_int8=True, fast_fp16=True, oom_times=0, parse_error=None, cuda=None):
    """A module-like namespace imitating ``tensorrt`` at ``version``."""
    gen10 = parse_version(version) >= (10,)
    has_pool = parse_version(version) >= (8, 4)
    calls = []
    state = {"oom_left": oom_times, "workspaces": []}

    class Config:
        def __init__(self):
            self.flags = set()
            self.int8_calibrator = None
            self.profiles = []
            self._cache = None

        def set_flag(self, flag):
            self.flags.add(flag)

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)

        def create_timing_cache(self, blob):
            calls.append("create_timing_cache")
            return SimpleNamespace(serialize=lambda: b"TIMINGCACHE")

        def set_timing_cache(self, cache, ignore_mismatch):
            self._cache = cache

        def get_timing_cache(self):
            return self._cache

    if gen10:
        def set_memory_pool_limit(self, pool, nbytes):
            calls.append(("set_memory_pool_limit", nbytes))
            self.workspace = nbytes
        Config.set_memory_pool_limit = set_memory_pool_limit
    else:
        def _set_ws(self, nbytes):
            calls.append(("max_workspace_size", nbytes))
            self.workspace = nbytes
        Config.max_workspace_size = property(lambda self: self.workspace, _set_ws)
        if has_pool:
            def set_memory_pool_limit(self, pool, nbytes):
                calls.append(("set_memory_pool_limit", nbytes))
                self.workspace = nbytes
            Config.set_memory_pool_limit = set_memory_pool_limit

    class Network:
        def __init__(self, flags):
            self.flags = flags
            self.onnx = None

    class Parser:
        def __init__(self, network, logger):
            self.network = network
            self.errors = []

        def parse(self, blob):
            calls.append("parse")
            if parse_error:
                self.errors = [FakeError(*parse_error)]
                return False
            self.network.onnx = blob
            return True

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, i):
            return self.errors[i]

    class Builder:
        platform_has_fast_int8 = fast_int8
        platform_has_fast_fp16 = fast_fp16

        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags):
            calls.append(("create_network", flags))
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            profile = SimpleNamespace(shapes={})
            profile.set_shape = lambda name, lo, opt, hi: profile.shapes.__setitem__(name, (lo, opt, hi))
            return profile

        def build_serialized_network(self, network, config):
            calls.append(("build", sorted(config.flags), config.workspace))
            state["workspaces"].append(config.workspace)
            if state["oom_left"] > 0:
                state["oom_left"] -= 1
                self.logger.log(_Severity.ERROR, "Requested amount of GPU memory could not be allocated: out of memory")
                return None
            if config.int8_calibrator is not None:  # calibrate: read batches until None, then write the cache
                calls.append("calibrate")
                while config.int8_calibrator.get_batch(["input"]) is not None:
                    pass
                config.int8_calibrator.write_calibration_cache(b"CALIBCACHE")
            return b"FAKEENGINE" + network.onnx

    class Engine:
        def __init__(self, onnx_bytes):
            self.session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
            self.io = [(i.name, True, i.shape) for i in self.session.get_inputs()] + \
                      [(o.name, False, o.shape) for o in self.session.get_outputs()]

        def create_execution_context(self):
            return Context(self)

    if gen10:
        Engine.num_io_tensors = property(lambda self: len(self.io))
        Engine.get_tensor_name = lambda self, i: self.io[i][0]
        Engine.get_tensor_mode = lambda self, name: (TensorIOMode.INPUT if dict((n, inp) for n, inp, _ in self.io)[name]
                                                     else TensorIOMode.OUTPUT)
        Engine.get_tensor_shape = lambda self, name: [d if isinstance(d, int) else -1
                                                      for d in dict((n, s) for n, _, s in self.io)[name]]
        Engine.get_tensor_dtype = lambda self, name: "float32"
    else:
        Engine.num_bindings = property(lambda self: len(self.io))
        Engine.get_binding_name = lambda self, i: self.io[i][0]
        Engine.binding_is_input = lambda self, i: self.io[i][1]
        Engine.get_binding_shape = lambda self, i: [d if isinstance(d, int) else -1 for d in self.io[i][2]]
        Engine.get_binding_dtype = lambda self, i: "float32"

    class Context:
        def __init__(self, engine):
            self.engine = engine
            self.shapes = {}
            self.addresses = {}

        def _run(self, addresses):
            (in_name, _, _), outs = self.engine.io[0], [e for e in self.engine.io if not e[1]]
            shape = self.shapes[in_name]
            x = np.frombuffer(bytes(cuda.memory[addresses[in_name]]), dtype=np.float32).reshape(shape)
            result = self.engine.session.run(None, {in_name: x})
            for (name, _, _), value in zip(outs, result):
                cuda.memory[addresses[name]][:] = np.ascontiguousarray(value, dtype=np.float32).tobytes()
            return True

        def _out_shape(self, name):
            batch = list(self.shapes.values())[0][0]
            shape = dict((n, s) for n, _, s in self.engine.io)[name]
            return [batch if not isinstance(d, int) else d for d in shape][:1] + [d for d in shape[1:]]

    if gen10:
        def set_input_shape(self, name, shape):
            calls.append("set_input_shape")
            self.shapes[name] = tuple(shape)

        def get_tensor_shape(self, name):
            return self.shapes[name] if name in self.shapes else self._out_shape(name)

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = ptr

        def execute_async_v3(self, stream_handle):
            calls.append("execute_async_v3")
            return self._run(self.addresses)

        Context.set_input_shape, Context.get_tensor_shape = set_input_shape, get_tensor_shape
        Context.set_tensor_address, Context.execute_async_v3 = set_tensor_address, execute_async_v3
    else:
        def set_binding_shape(self, index, shape):
            calls.append("set_binding_shape")
            self.shapes[self.engine.io[index][0]] = tuple(shape)

        def get_binding_shape(self, index):
            name = self.engine.io[index][0]
            return self.shapes[name] if name in self.shapes else self._out_shape(name)

        def execute_async_v2(self, bindings, stream_handle):
            calls.append("execute_async_v2")
            return self._run(dict((name, ptr) for (name, _, _), ptr in zip(self.engine.io, bindings)))

        Context.set_binding_shape, Context.get_binding_shape = set_binding_shape, get_binding_shape
        Context.execute_async_v2 = execute_async_v2

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, blob):
            calls.append("deserialize")
            if not blob.startswith(b"FAKEENGINE"):
                return None
            return Engine(blob[len(b"FAKEENGINE"):])

    TensorIOMode = SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    module = SimpleNamespace(
        __version__=version, ILogger=_ILogger, IInt8EntropyCalibrator2=_Calibrator, Builder=Builder,
        OnnxParser=Parser, Runtime=Runtime, nptype=lambda dtype: np.dtype(dtype),
        BuilderFlag=SimpleNamespace(FP16="FP16", INT8="INT8"),
        MemoryPoolType=SimpleNamespace(WORKSPACE="WORKSPACE"), TensorIOMode=TensorIOMode,
        NetworkDefinitionCreationFlag=SimpleNamespace(EXPLICIT_BATCH=0),
        calls=calls, state=state,
    )
    return module
