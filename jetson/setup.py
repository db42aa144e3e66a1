"""edgerun: the device runtime of edgedistill. `pip3 install ./jetson` on a Jetson (JetPack 4.6+, Python 3.6+).

Only numpy is required from PyPI. OpenCV, TensorRT and pycuda come from JetPack itself (JetPack's OpenCV is
built with GStreamer, which CSI cameras need; pip's opencv-python lacks it and would shadow it, so it is
never pulled in here). onnxruntime is optional (`pip3 install ./jetson[ort]`) for the ONNX Runtime runner.
"""
from setuptools import setup

setup(
    name="edgerun",
    version="0.1.0",
    description="Run and benchmark edgedistill bundles on NVIDIA Jetson devices (TensorRT or ONNX Runtime)",
    packages=["edgerun"],
    python_requires=">=3.6",
    install_requires=["numpy>=1.13"],
    extras_require={"ort": ["onnxruntime>=1.10"]},
    entry_points={"console_scripts": ["edgerun = edgerun.cli:main"]},
)
