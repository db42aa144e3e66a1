"""edgerun: the device side of edgedistill.

Runs on a Jetson (JetPack 4.6 / Python 3.6 up to JetPack 6 / Python 3.10) and on a workstation.
Depends on numpy and OpenCV only at import time; tensorrt, pycuda and onnxruntime are imported
lazily by the runners that need them. Never imports torch.
"""

__version__ = "0.1.0"
