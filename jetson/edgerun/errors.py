"""Typed errors of the device runtime. Each message says what failed and what to do."""


class EdgerunError(Exception):
    """Base class of every error edgerun raises on purpose."""


class BundleError(EdgerunError):
    """A bundle (folder or .edb archive) is malformed, tampered with or of an unknown schema."""


class UnsafeArchiveError(BundleError):
    """An archive member would escape the target folder or is not a plain file."""


class SignatureError(BundleError):
    """A bundle is unsigned, signed by an untrusted key, or changed after signing; or a key is unusable."""


class EngineBuildError(EdgerunError):
    """TensorRT could not build an engine from the bundle's ONNX model."""


class EngineMismatchError(EdgerunError):
    """A serialized engine was built by another TensorRT version or on another device."""


class RunnerError(EdgerunError):
    """A runner was used wrongly (not activated, wrong feed names or shapes) or its backend is missing."""


class SourceError(EdgerunError):
    """A camera or video source could not be opened or was lost for good."""
