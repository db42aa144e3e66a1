"""The way back from the camera: is the line still showing the model what it was validated on, and which frames
is it unsure of?

Drift is measured as the population stability index (PSI) of two distributions the model itself produces, so
it needs no labels on the line: its top-1 confidence (binned at the reference's deciles) and its predicted
classes, in a rolling window of frames against the same model's outputs on the bundle's own validation images,
run through the same runner on this device at start-up. PSI = sum((a - e) * ln(a / e)) over bins; the
credit-scoring convention reads < 0.1 as stable, 0.1-0.25 as a moderate shift and > 0.25 as a significant one
(Yurdakul, "Statistical properties of population stability index", 2018), hence the default threshold 0.25.

Frames the student is unsure of (a small margin between its top two probabilities) are the ones a teacher's
label teaches most: they are saved, capped, with their scores, for ``edgedistill deploy --pull-frames`` and
``--set data.unlabeled=<that folder>``. Python 3.6, numpy and OpenCV only.
"""

import collections
import csv
import os

import numpy as np

from edgerun.errors import EdgerunError

EPS = 1e-4  # a bin empty on one side would make PSI infinite: both sides are floored at this share


def psi(expected, actual, eps=EPS):
    """Population stability index of two histograms (counts or shares over the same bins)."""
    e = np.asarray(expected, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    e = np.maximum(e / max(e.sum(), 1e-12), eps)
    a = np.maximum(a / max(a.sum(), 1e-12), eps)
    return float(np.sum((a - e) * np.log(a / e)))


def confidence_edges(reference, bins=10):
    """Inner bin edges at the reference confidences' quantiles (deciles by default), duplicates merged (a model
    sure of most images puts many deciles at 1.0)."""
    qs = np.percentile(np.asarray(reference, dtype=np.float64), np.linspace(0, 100, bins + 1)[1:-1])  # numpy 1.13
    return np.unique(qs)


def histogram(values, edges):
    return np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)


class DriftWatch(object):
    """Per frame: ``add(probabilities)``; every ``window`` frames the window's PSI against the reference is
    checked, and a check above ``threshold`` calls ``warn(text)`` and is counted."""

    def __init__(self, reference_probs, window=500, threshold=0.25, warn=None, reference_name="reference"):
        ref = np.asarray(reference_probs, dtype=np.float64)
        if ref.ndim != 2 or len(ref) < 20:
            raise EdgerunError("drift watch: the reference needs at least 20 images' outputs, got %s" % (ref.shape,))
        if window < 50:
            raise EdgerunError(
                "--drift-window %d: at least 50 frames, so a window's histogram means something" % window
            )
        self.n_classes = ref.shape[1]
        self.edges = confidence_edges(ref.max(1))
        self.ref_conf = histogram(ref.max(1), self.edges)
        self.ref_class = np.bincount(ref.argmax(1), minlength=self.n_classes)
        self.window = int(window)
        self.threshold = float(threshold)
        self.warn = warn
        self.reference_name = reference_name
        self.recent = collections.deque(maxlen=self.window)
        self.seen = 0
        self.checks = collections.deque(maxlen=1000)  # the latest checks; worst and counts are kept apart
        self.n_checks = 0
        self.worst = None
        self.warnings = 0
        self.first_warning_frame = None

    def add(self, probs):
        """One frame's probabilities (1-D)."""
        p = np.asarray(probs, dtype=np.float64).ravel()
        self.recent.append((float(p.max()), int(p.argmax())))
        self.seen += 1
        if self.seen % self.window == 0:
            self._check()

    def _check(self):
        conf = np.array([c for c, _ in self.recent])
        classes = np.array([k for _, k in self.recent])
        check = {
            "frame": self.seen,
            "confidence_psi": psi(self.ref_conf, histogram(conf, self.edges)),
            "class_psi": psi(self.ref_class, np.bincount(classes, minlength=self.n_classes)),
            "mean_confidence": float(conf.mean()),
        }
        check["drift"] = max(check["confidence_psi"], check["class_psi"]) > self.threshold
        self.checks.append(check)
        self.n_checks += 1
        if self.worst is None or max(check["confidence_psi"], check["class_psi"]) > max(
            self.worst["confidence_psi"], self.worst["class_psi"]
        ):
            self.worst = check
        if check["drift"]:
            self.warnings += 1
            if self.first_warning_frame is None:
                self.first_warning_frame = self.seen
            if self.warn:
                self.warn(
                    "DRIFT at frame %d: confidence PSI %.3f, class PSI %.3f over the last %d frames (threshold "
                    "%.2f) against %s"
                    % (
                        self.seen,
                        check["confidence_psi"],
                        check["class_psi"],
                        self.window,
                        self.threshold,
                        self.reference_name,
                    )
                )

    def summary(self):
        return {
            "reference": self.reference_name,
            "window": self.window,
            "threshold": self.threshold,
            "frames": self.seen,
            "checks": self.n_checks,
            "last": self.checks[-1] if self.checks else None,
            "worst": self.worst,
            "warnings": self.warnings,
            "first_warning_frame": self.first_warning_frame,
            "status": (
                "not checked (fewer frames than one window)"
                if not self.n_checks
                else "DRIFT"
                if self.warnings
                else "stable"
            ),
            "history": list(self.checks)[-200:],
        }


class UnsureFrames(object):
    """Saves frames whose top-two probability margin is under ``margin`` to ``folder`` (JPEG) with an
    ``index.csv`` of their scores, at most ``cap`` of them; the rest are counted, not saved."""

    INDEX = "index.csv"

    def __init__(self, folder, classes, margin=0.2, cap=200):
        if not 0 < margin <= 1:
            raise EdgerunError("--unsure-margin %g: a probability margin in (0, 1]" % margin)
        if cap < 1:
            raise EdgerunError("--save-unsure-max %d: at least 1" % cap)
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise EdgerunError("--save-unsure %s: cannot create the folder (%s)" % (folder, exc)) from exc
        self.folder, self.classes, self.margin, self.cap = folder, list(classes), float(margin), int(cap)
        index = os.path.join(folder, self.INDEX)
        self.saved = 0
        if os.path.exists(index):  # a folder kept from an earlier run: continue its numbering and its cap
            with open(index) as fh:
                self.saved = max(0, sum(1 for _ in fh) - 1)
        self.fh = open(index, "a")
        self.writer = csv.writer(self.fh)
        if self.saved == 0 and self.fh.tell() == 0:
            self.writer.writerow(
                ["file", "frame", "class", "p1", "second", "p2", "margin"] + ["p_%s" % c for c in self.classes]
            )
        self.unsure = 0
        self.not_saved = 0

    def add(self, index, frame_bgr, probs):
        import cv2

        p = np.asarray(probs, dtype=np.float64).ravel()
        order = np.argsort(p)[::-1]
        margin = float(p[order[0]] - p[order[1]]) if len(p) > 1 else 1.0
        if margin >= self.margin:
            return False
        self.unsure += 1
        if self.saved >= self.cap:
            self.not_saved += 1
            return False
        name = "unsure_%06d_frame%08d.jpg" % (self.saved, index)
        if not cv2.imwrite(os.path.join(self.folder, name), frame_bgr):
            raise EdgerunError("--save-unsure %s: cannot write %s (disk full?)" % (self.folder, name))
        self.writer.writerow(
            [
                name,
                index,
                self.classes[order[0]],
                "%.6f" % p[order[0]],
                self.classes[order[1]] if len(p) > 1 else "",
                "%.6f" % p[order[1]] if len(p) > 1 else "",
                "%.6f" % margin,
            ]
            + ["%.6f" % v for v in p]
        )
        self.fh.flush()
        self.saved += 1
        return True

    def close(self):
        self.fh.close()

    def summary(self):
        return {
            "folder": self.folder,
            "margin": self.margin,
            "cap": self.cap,
            "unsure_frames": self.unsure,
            "saved": self.saved,
            "not_saved_over_cap": self.not_saved,
            "index": os.path.join(self.folder, self.INDEX),
        }
