"""One table of targets: what an engine is built with and what the device offers.

Export (ONNX opset, whether INT8 is worth it), build (TensorRT API generation, workspace) and bench (memory
budget, device identity) all read this table, so a fact is written once.

Sources (NVIDIA documentation, as of each JetPack release):
- JetPack 4.6.x release notes: JetPack 4.6 is L4T R32.6.1 with TensorRT 8.0.1 (and DeepStream 6.0); JetPack 4.6.1
  and later 4.6.x are L4T R32.7.x with TensorRT 8.2.1 (DeepStream 6.0.1), CUDA 10.2, Ubuntu 18.04 with Python
  3.6. The ``-jp4`` targets are JetPack 4.6.1 and later: edgerun refuses TensorRT 8.0 and says so.
  JetPack 5.1.x: L4T R35, TensorRT 8.5.2, CUDA 11.4, Python 3.8. JetPack 6.1/6.2: L4T R36.4,
  TensorRT 10.3, CUDA 12.6, Python 3.10.
- ONNX opsets the bundled parser takes: onnx-tensorrt README for TensorRT 8.2/8.4 ("supports ONNX release
  1.8.0", i.e. opset 13); TensorRT 8.5 support matrix: ONNX 1.12 (opset 17); TensorRT 10.x: opset 17 is
  well inside what its parser takes (up to 20 and more), so 17 is exported for it.
- INT8: the TensorRT support matrix ("Hardware and Precision") lists INT8 for compute capability 6.1 and
  7.x/8.x; Maxwell sm_53 (Nano) and Pascal sm_62 (TX2) have no fast INT8 path, so INT8 there is slower than
  FP16. Xavier (sm_72) and Orin (sm_87) have INT8 tensor cores.
- Memory: Jetson module data sheets (Nano 4 GB/2 GB, TX2 8 GB, Xavier NX 8 GB, AGX Xavier 32 GB, Orin Nano
  8 GB, Orin NX 16 GB, AGX Orin 64 GB); CPU and GPU share it.
- GPU peaks (``gpu``: GFLOPS and GB/s, read by the workstation's planner): derived, not measured, from the
  module data sheets' CUDA-core and tensor-core counts at the maximum GPU clock of the profile's JetPack
  (Nano 128 cores at 921.6 MHz; TX2 256 at 1300 MHz; Xavier NX 384 + 48 tensor cores at 1100 MHz; AGX Xavier
  512 + 64 at 1377 MHz; Orin Nano 8GB 1024 + 32 at 625 MHz (JetPack 6.1, before the 6.2 "Super" clocks);
  Orin NX 16GB 1024 + 32 at 918 MHz; AGX Orin 64GB 2048 + 64 at 1300 MHz). FP32 = cores x 2 x clock; FP16 on
  CUDA cores = 2 x FP32 (paired half); dense FP16 on tensor cores = 64 FMA/clock per Volta tensor core and
  256 per Ampere (Orin) tensor core; INT8 tensor = 2 x FP16 tensor. Memory bandwidth from the data sheets
  (Nano 25.6, TX2 59.7, Xavier NX 51.2, AGX Xavier 136.5, Orin Nano 8GB 68, Orin NX 102.4, AGX Orin
  204.8 GB/s).
"""

from edgerun.errors import EdgerunError

JETPACK_4 = {"jetpack": "4.6.1", "l4t": "R32.7", "tensorrt": "8.2", "cuda": "10.2", "python": "3.6", "max_opset": 13}
JETPACK_5 = {"jetpack": "5.1", "l4t": "R35.4", "tensorrt": "8.5", "cuda": "11.4", "python": "3.8", "max_opset": 17}
JETPACK_6 = {"jetpack": "6.1", "l4t": "R36.4", "tensorrt": "10.3", "cuda": "12.6", "python": "3.10", "max_opset": 17}


def _gpu(cuda_cores, tensor_cores, clock_mhz, fma_per_tensor_core, bandwidth_gbps):
    fp32 = cuda_cores * 2 * clock_mhz / 1000.0
    tensor_fp16 = tensor_cores * fma_per_tensor_core * 2 * clock_mhz / 1000.0
    return {
        "cuda_cores": cuda_cores,
        "tensor_cores": tensor_cores,
        "clock_mhz": clock_mhz,
        "fp32_gflops": round(fp32, 1),
        "fp16_cuda_gflops": round(2 * fp32, 1),
        "fp16_tensor_gflops": round(tensor_fp16, 1) or None,
        "int8_tensor_gops": round(2 * tensor_fp16, 1) or None,
        "memory_gbps": bandwidth_gbps,
    }


NANO_GPU = _gpu(128, 0, 921.6, 0, 25.6)
TX2_GPU = _gpu(256, 0, 1300.0, 0, 59.7)
XAVIER_NX_GPU = _gpu(384, 48, 1100.0, 64, 51.2)
AGX_XAVIER_GPU = _gpu(512, 64, 1377.0, 64, 136.5)
ORIN_NANO_GPU = _gpu(1024, 32, 625.0, 256, 68.0)
ORIN_NX_GPU = _gpu(1024, 32, 918.0, 256, 102.4)
AGX_ORIN_GPU = _gpu(2048, 64, 1300.0, 256, 204.8)


def _target(base, device, sm, memory_mb, fast_int8, **extra):
    facts = dict(base)
    facts.update(
        {
            "device": device,
            "compute_capability": sm,
            "memory_mb": memory_mb,
            "fast_int8": fast_int8,
            "runtime": "tensorrt",
        }
    )
    facts.update(extra)
    return facts


# dla_cores: NVIDIA's Jetson module data sheets (Nano, TX2 and Orin Nano have no Deep Learning Accelerator; Xavier NX,
# AGX Xavier, Orin NX 16GB and AGX Orin have two)
TARGETS = {
    "jetson-nano-jp4": _target(JETPACK_4, "Jetson Nano 4GB", "5.3", 4096, False, gpu=NANO_GPU, dla_cores=0),
    "jetson-nano-2gb-jp4": _target(JETPACK_4, "Jetson Nano 2GB", "5.3", 2048, False, gpu=NANO_GPU, dla_cores=0),
    "jetson-tx2-jp4": _target(JETPACK_4, "Jetson TX2", "6.2", 8192, False, gpu=TX2_GPU, dla_cores=0),
    "xavier-nx-jp5": _target(JETPACK_5, "Jetson Xavier NX", "7.2", 8192, True, gpu=XAVIER_NX_GPU, dla_cores=2),
    "agx-xavier-jp5": _target(JETPACK_5, "Jetson AGX Xavier", "7.2", 32768, True, gpu=AGX_XAVIER_GPU, dla_cores=2),
    "jetson-orin-nano-jp6": _target(
        JETPACK_6, "Jetson Orin Nano 8GB", "8.7", 8192, True, gpu=ORIN_NANO_GPU, dla_cores=0
    ),
    "orin-nx-jp6": _target(JETPACK_6, "Jetson Orin NX 16GB", "8.7", 16384, True, gpu=ORIN_NX_GPU, dla_cores=2),
    "agx-orin-jp6": _target(JETPACK_6, "Jetson AGX Orin 64GB", "8.7", 65536, True, gpu=AGX_ORIN_GPU, dla_cores=2),
    "generic-x86-ort": {
        "device": "x86-64 CPU (ONNX Runtime)",
        "runtime": "onnxruntime",
        "max_opset": 17,
        "fast_int8": True,
        "memory_mb": None,
        "compute_capability": None,
        "jetpack": None,
        "l4t": None,
        "tensorrt": None,
        "cuda": None,
        "python": "3.8+",
    },
}


def get_target(name):
    try:
        return dict(TARGETS[name], name=name)
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, list(TARGETS), n=1)
        raise EdgerunError(
            "unknown target profile '%s'%s; known: %s"
            % (name, " (did you mean '%s'?)" % close[0] if close else "", ", ".join(sorted(TARGETS)))
        ) from None


def parse_version(text):
    """'8.2.1.8' -> (8, 2, 1, 8): versions compare as tuples of ints, never as strings."""
    parts = []
    for piece in str(text).split("."):
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def explicit_int8_variant(manifest):
    """The bundle's explicit-quantization (Q/DQ) INT8 model, which every TensorRT builds without a calibrator: the
    ``int8`` variant of bundles from this release, the ``int8_trt`` one of older TensorRT 10 bundles; else None."""
    variant = manifest.variant("int8")
    if variant and variant.get("explicit_quantization"):
        return variant
    return manifest.variant("int8_trt")


def uses_explicit_quantization(target):
    """TensorRT 10 deprecates implicit (calibrator) INT8: such targets take a QDQ ONNX instead."""
    return target.get("runtime") == "tensorrt" and parse_version(target["tensorrt"]) >= (10,)


def match_device(compute_capability, memory_mb):
    """The profile of the device we run on, by compute capability and memory (closest memory wins)."""
    best = None
    for name, facts in sorted(TARGETS.items()):
        if facts.get("compute_capability") != compute_capability or not facts.get("memory_mb"):
            continue
        gap = abs(facts["memory_mb"] - memory_mb)
        if best is None or gap < best[0]:
            best = (gap, name)
    return get_target(best[1]) if best else None
