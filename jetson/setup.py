"""edgerun: the device runtime of edgedistill. `pip3 install ./jetson` on a Jetson (JetPack 4.6+, Python 3.6+).

Only numpy is required from PyPI. OpenCV, TensorRT and pycuda come from JetPack itself (JetPack's OpenCV is
built with GStreamer, which CSI cameras need; pip's opencv-python lacks it and would shadow it, so it is
never pulled in here). onnxruntime is optional (`pip3 install ./jetson[ort]`) for the ONNX Runtime runner;
cryptography is optional (`pip3 install ./jetson[sign]`) for devices that accept signed bundles only.
"""

from setuptools import find_packages, setup

setup(
    name="edgerun",
    version="0.1.0",
    description="Run and benchmark edgedistill bundles on NVIDIA Jetson devices (TensorRT or ONNX Runtime)",
    packages=find_packages(include=["edgerun", "edgerun.*"]),
    python_requires=">=3.6",
    # JetPack 5 (Python 3.8) ships TensorRT 8.5, whose Python package refers to np.bool, removed in numpy 1.24
    # (NVIDIA/TensorRT#2557): keep numpy below 1.24 there. edgerun itself maps types with its own table.
    install_requires=["numpy>=1.13,<1.24; python_version < '3.9'", "numpy>=1.13; python_version >= '3.9'"],
    # cryptography 2.6 brought Ed25519; its releases up to 40.x still support Python 3.6 (JetPack 4.6)
    extras_require={
        "ort": ["onnxruntime>=1.10"],
        "sign": ["cryptography>=2.6,<41; python_version < '3.7'", "cryptography>=2.6; python_version >= '3.7'"],
    },
    entry_points={"console_scripts": ["edgerun = edgerun.cli:main"]},
)
