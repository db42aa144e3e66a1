"""Run a TensorRT engine: page-locked host buffers, one CUDA stream, async copies, CUDA-event timing, the engine's
record and bytes checked before it is deserialized, device memory measured as a Jetson counts it.

TensorRT, pycuda and the device's facts are reached through ``edgerun.runtime.trt``.
"""

import os

import numpy as np

from edgerun.device import process_memory_mb
from edgerun.errors import EngineMismatchError, RunnerError
from edgerun.runtime import trt as _trt
from edgerun.runtime.runners import Runner


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
        cuda = self._cuda or _trt.import_cuda()
        trt = self._trt or _trt.import_tensorrt()
        # pushed around every call (any thread may infer); device memory is measured from here (engine load on)
        self.cuda_context, self.free_at_start, _ = _trt.cuda_context(cuda)
        self.rss_at_start = process_memory_mb()[0]
        if not os.path.isfile(str(self.engine_path)):
            raise EngineMismatchError("engine '%s' does not exist: build it with `edgerun build`" % self.engine_path)
        with open(self.engine_path, "rb") as fh:
            blob = fh.read()  # one read: the bytes checked against the record are the bytes deserialized
        self.meta = _trt.check_engine(self.engine_path, self.bundle, trt, self.gpu, self.board, engine_bytes=blob)
        self.precision = self.meta.get("precision") or "fp32"
        self.api = _trt.select_api(trt)
        self.logger = _trt.make_logger(trt)
        self.runtime = trt.Runtime(self.logger)
        dla = self.meta.get("dla")
        if dla:  # the core the engine was built for, set before deserializing (as trtexec and jetson-inference do)
            self.runtime.DLA_core = int(dla["core"])
        self.engine = self.runtime.deserialize_cuda_engine(blob)
        if self.engine is None:
            raise EngineMismatchError(
                "TensorRT %s could not deserialize '%s' (%s): rebuild it with `edgerun build`"
                % (trt.__version__, self.engine_path, "; ".join(str(m) for _, m in self.logger.messages[-3:]))
            )
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise RunnerError(
                "TensorRT could not create an execution context for '%s' (out of device memory?): "
                "close other GPU programs, or rebuild with a smaller --workspace-mb; TensorRT said: %s"
                % (self.engine_path, "; ".join(str(m) for _, m in self.logger.messages[-3:]) or "-")
            )
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
                dla = self.meta.get("dla") or {}
                if dla.get("batch") is not None and want and want[0] != dla["batch"]:
                    raise RunnerError(
                        "engine '%s' runs on DLA core %s at batch %d only (the DLA runs static shapes), the feed "
                        "is batch %d: feed %d, or rebuild with --dla-batch %d"
                        % (self.engine_path, dla["core"], dla["batch"], want[0], dla["batch"], want[0])
                    )
                if len(want) != len(fixed) or any(f >= 0 and f != w for f, w in zip(fixed, want)):
                    raise RunnerError(
                        "input '%s' of engine '%s' is fixed at %s, the feed is %s: %s"
                        % (
                            tensor["name"],
                            self.engine_path,
                            fixed,
                            want,
                            "feed batch %d, or export with export.dynamic_batch and rebuild" % fixed[0]
                            if fixed and fixed[0] >= 0
                            else "match the engine's shape",
                        )
                    )
                if not self.api.set_input_shape(self.context, tensor, want):
                    raise RunnerError(
                        "engine '%s' refused input shape %s for '%s' (outside its optimization "
                        "profile?)" % (self.engine_path, want, tensor["name"])
                    )
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
        self.last_timing = {
            "h2d": ev[1].time_since(ev[0]) / 1e3,
            "compute": ev[2].time_since(ev[1]) / 1e3,
            "d2h": ev[3].time_since(ev[2]) / 1e3,
        }
        return outputs

    def device_memory(self):
        """Device memory taken since activation (engine, context, I/O buffers): nvmap's per-process figure where
        readable (root), else the drop of cuda.mem_get_info()'s free memory, which on a Jetson's shared DRAM also
        moves with other processes."""
        from edgerun.device import nvmap_memory

        nvmap = nvmap_memory()
        if nvmap is not None:
            return nvmap
        self.cuda_context.push()
        try:
            free_now = self.cuda.mem_get_info()[0]
        finally:
            self.cuda.Context.pop()
        drop = max(0, self.free_at_start - free_now) / float(1 << 20)
        shared = (self.gpu or {}).get("integrated")
        if not (_trt.is_tegra() if shared is None else shared):
            return {"mb": drop, "method": "cuda.mem_get_info free-memory drop from engine load to now"}
        # a Jetson's GPU shares DRAM with the CPU: its free figure is the OS's, so the drop also holds every host
        # byte this process took meanwhile (TensorRT's host-side set-up, frames, Python's heap), which VmHWM
        # already counts; take the process's own RSS growth over the same interval out
        rss_now = process_memory_mb()[0]
        growth = max(0.0, rss_now - self.rss_at_start) if rss_now is not None and self.rss_at_start is not None else 0.0
        context = _trt.CUDA_CONTEXT["mb"]
        return {
            "mb": max(0.0, drop - growth) + (context or 0.0),
            "method": "cuda.mem_get_info free-memory drop from engine load to now (%.0f MB), less this "
            "process's RSS growth over the same interval (%.0f MB, host memory counted in VmHWM), %s; "
            "other processes move it too"
            % (
                drop,
                growth,
                "plus the CUDA context's own %.0f MB (MemAvailable drop as it was made)" % context
                if context is not None
                else "without the CUDA context's own memory (made before this process measured)",
            ),
        }

    def _deactivate(self):
        self.context = None
        self.engine = None
        self.runtime = None
        self.host, self.device, self.shapes = {}, {}, {}
