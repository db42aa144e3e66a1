"""Image preprocessing shared by training-time evaluation and the device.

The workstation evaluates models with exactly this function and the device feeds engines with it, so
the accuracy measured on the host is the accuracy of the pipeline that runs on the line. The facts it
needs (resize, crop, interpolation, mean/std, scale, channel order, layout) are the same facts timm keeps
in a model's ``pretrained_cfg``; they travel in the bundle manifest (see ``edgerun.bundle.manifest``).
"""

import cv2
import numpy as np

INTERPOLATIONS = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
}


class PreprocessSpec(object):
    """How a raw uint8 image becomes the model's float input.

    resize: the shorter image side is scaled to this many pixels (aspect kept), then
    crop: a centred crop of (height, width) is taken; pixel values are multiplied by ``scale``,
    normalized with ``mean``/``std`` (per channel, in ``channel_order``) and laid out as ``layout``.

    The constructor takes the nine fields as keywords: this class is itself the spec object (the manifest's
    ``preprocess`` section, ``PreprocessSpec(**section)``), and each argument is validated where it arrives.
    """

    FIELDS = ("resize", "crop", "interpolation", "mean", "std", "scale", "channel_order", "layout", "dtype")

    def __init__(
        self,
        resize,
        crop,
        interpolation="bilinear",
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        scale=1.0 / 255.0,
        channel_order="RGB",
        layout="NCHW",
        dtype="float32",
    ):
        if interpolation not in INTERPOLATIONS:
            raise ValueError(
                "preprocess.interpolation must be one of %s, not %r" % (sorted(INTERPOLATIONS), interpolation)
            )
        if channel_order not in ("RGB", "BGR"):
            raise ValueError("preprocess.channel_order must be 'RGB' or 'BGR', not %r" % (channel_order,))
        if layout not in ("NCHW", "NHWC"):
            raise ValueError("preprocess.layout must be 'NCHW' or 'NHWC', not %r" % (layout,))
        if isinstance(crop, int):
            crop = (crop, crop)
        self.resize = int(resize)
        self.crop = (int(crop[0]), int(crop[1]))
        if self.resize < min(self.crop):
            raise ValueError("preprocess.resize (%d) must be at least the crop size %s" % (self.resize, self.crop))
        self.interpolation = interpolation
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.scale = float(scale)
        self.channel_order = channel_order
        self.layout = layout
        self.dtype = dtype

    def to_dict(self):
        out = {}
        for name in self.FIELDS:
            value = getattr(self, name)
            out[name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data):
        unknown = sorted(set(data) - set(cls.FIELDS))
        if unknown:
            raise ValueError("unknown preprocess keys %s (known: %s)" % (unknown, list(cls.FIELDS)))
        return cls(**data)

    def __eq__(self, other):
        return isinstance(other, PreprocessSpec) and self.to_dict() == other.to_dict()

    def __repr__(self):
        return "PreprocessSpec(%s)" % ", ".join("%s=%r" % (k, v) for k, v in sorted(self.to_dict().items()))


def to_three_channels(image):
    """Grayscale (H, W) or (H, W, 1) becomes (H, W, 3); 4-channel drops alpha."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    if image.shape[2] == 4:
        return image[:, :, :3]
    return image


def resize_shorter_side(image, size, interpolation="bilinear"):
    """Scale so that the shorter side is ``size`` pixels, keeping the aspect ratio."""
    h, w = image.shape[:2]
    if min(h, w) == size:
        return image
    if h <= w:
        new_h, new_w = size, max(size, int(round(w * size / float(h))))
    else:
        new_h, new_w = max(size, int(round(h * size / float(w)))), size
    resized = cv2.resize(image, (new_w, new_h), interpolation=INTERPOLATIONS[interpolation])
    if resized.ndim == 2:
        resized = resized[:, :, None]
    return resized


def center_crop(image, crop):
    ch, cw = crop
    h, w = image.shape[:2]
    top = max(0, (h - ch) // 2)
    left = max(0, (w - cw) // 2)
    return image[top : top + ch, left : left + cw]


def geometric(image, spec):
    """Resize and crop one uint8 image; returns uint8 (crop_h, crop_w, 3)."""
    image = to_three_channels(np.asarray(image))
    image = resize_shorter_side(image, spec.resize, spec.interpolation)
    return center_crop(image, spec.crop)


def normalize(batch_hwc, spec, input_order="RGB"):
    """uint8 (N, H, W, 3) in ``input_order`` -> the model's float layout."""
    batch = np.asarray(batch_hwc)
    if input_order != spec.channel_order:
        batch = batch[..., ::-1]
    mean = np.asarray(spec.mean, dtype=np.float32) / spec.scale
    inv_std = spec.scale / np.asarray(spec.std, dtype=np.float32)
    out = (batch.astype(np.float32) - mean) * inv_std
    if spec.layout == "NCHW":
        out = out.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(out, dtype=np.dtype(spec.dtype))


def preprocess(images, spec, input_order="RGB"):
    """A sequence of uint8 images (a list, or an (N, H, W[, C]) array) -> one float batch for the model.

    ``input_order`` is the channel order of the given images: "BGR" for frames from OpenCV
    (cv2.imread, cv2.VideoCapture), "RGB" for arrays stored in a bundle's ``val.npz``.
    """
    crops = [geometric(image, spec) for image in images]
    return normalize(np.stack(crops), spec, input_order)
