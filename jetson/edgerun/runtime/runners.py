"""Runners: one interface for every backend, in the spirit of Polygraphy's runners.

    with OrtRunner("model.onnx") as runner:           # activate() on enter, deactivate() on exit
        outputs = runner.infer({"input": batch})      # dict name -> ndarray in, dict name -> ndarray out

``TrtRunner`` (edgerun.runtime.trt_run) implements the same interface for TensorRT engines. Runners record the time
of their last inference split into stages (host->device, compute, device->host) in ``last_timing``.
"""

import time

import numpy as np

from edgerun.errors import RunnerError


class Runner(object):
    """Base class: subclasses implement ``_activate``, ``_infer`` and ``_deactivate``."""

    name = "runner"
    precision = "fp32"  # what the model computes in: the reject threshold of that variant applies

    def __init__(self):
        self.is_active = False
        self.last_timing = {}

    def activate(self):
        if self.is_active:
            raise RunnerError("%s is already active" % self.name)
        self._activate()
        self.is_active = True
        return self

    def deactivate(self):
        if self.is_active:
            self._deactivate()
            self.is_active = False

    def __enter__(self):
        return self.activate()

    def __exit__(self, exc_type, exc, tb):
        self.deactivate()

    def infer(self, feed):
        if not self.is_active:
            raise RunnerError("%s.infer() before activate(): use the runner as a context manager" % self.name)
        if not isinstance(feed, dict):
            raise RunnerError("infer() takes a dict of input name -> ndarray, not %s" % type(feed).__name__)
        expected = set(self.input_names())
        if set(feed) != expected:
            raise RunnerError(
                "%s: feed has inputs %s, the model takes %s" % (self.name, sorted(feed), sorted(expected))
            )
        return self._infer(feed)

    def device_memory(self):
        """GPU memory this runner holds, as {'mb': ..., 'method': ...}; None where it holds none (CPU runners)."""
        return None

    # subclass hooks
    def input_names(self):
        raise NotImplementedError

    def _activate(self):
        raise NotImplementedError

    def _infer(self, feed):
        raise NotImplementedError

    def _deactivate(self):
        raise NotImplementedError


GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


class OrtRunner(Runner):
    """ONNX Runtime: CPU here; CUDA/TensorRT execution providers when the installed build has them."""

    name = "onnxruntime"

    def __init__(self, model_path, providers=None, threads=None, precision="fp32"):
        Runner.__init__(self)
        self.model_path = str(model_path)
        self.precision = precision
        self.requested_providers = providers
        self.threads = threads
        self.session = None
        self.providers = []

    def _activate(self):
        try:
            import onnxruntime as ort
        except ImportError:
            raise RunnerError(
                "onnxruntime is not installed: pip3 install onnxruntime (or onnxruntime-gpu; on "
                "Jetson, NVIDIA's wheel for your JetPack), or use --backend tensorrt"
            ) from None
        options = ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = int(self.threads)
        available = ort.get_available_providers()
        providers = self.requested_providers or [
            p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available
        ]
        try:
            self.session = ort.InferenceSession(self.model_path, sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            raise RunnerError("onnxruntime cannot load '%s': %s" % (self.model_path, exc)) from exc
        self.providers = self.session.get_providers()

    def input_names(self):
        return [i.name for i in self.session.get_inputs()]

    def output_names(self):
        return [o.name for o in self.session.get_outputs()]

    def _infer(self, feed):
        start = time.perf_counter()
        outputs = self.session.run(None, feed)
        self.last_timing = {"compute": time.perf_counter() - start}
        return dict(zip(self.output_names(), outputs))

    def device_memory(self):
        """None on the CPU provider; on a GPU provider nvmap's per-process figure where readable (a Jetson, as
        root), else 'not measured' — onnxruntime's CUDA arena is invisible from here, and never counts as 0."""
        gpu = [p for p in (self.providers or []) if p in GPU_PROVIDERS]
        if not gpu:
            return None
        from edgerun.device import nvmap_memory

        nvmap = nvmap_memory()
        if nvmap is not None:
            return nvmap
        return {
            "mb": None,
            "method": "%s memory not measured: nvmap's table is unreadable (run as root on a "
            "Jetson) or this is not a Jetson; use --backend tensorrt for a measured "
            "figure" % gpu[0],
        }

    def _deactivate(self):
        self.session = None


def infer_chunk(runner, chunk, input_name, output_name, batch=None):
    """Outputs of one preprocessed chunk through any runner. With a fixed engine batch ``batch``, a shorter
    last chunk is padded by repeating its last item and the padding is cut from the result."""
    n = len(chunk)
    if batch and n < batch:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
    return np.asarray(runner.infer({input_name: np.ascontiguousarray(chunk)})[output_name])[:n]
