"""The line camera: CSI (nvarguscamerasrc), USB/V4L2, RTSP or a video file, classified frame by frame.

Frames come from ``edgerun.line.capture`` (a thread that keeps the newest frame of a live source, preprocesses it, and
reopens a lost source a bounded number of times). Each frame is classified (or measured) alone, the reject
decision taken, the row written as it happens; the drift watch, unsure frames, soak and the service heartbeat
watch every frame. After a source is lost for good a SourceError is raised, with the predictions and the summary
of the frames processed so far already written.
"""

import csv
import os
import time

import cv2
import numpy as np

from edgerun.bench import percentile
from edgerun.decision import softmax, threshold_for
from edgerun.errors import SourceError
from edgerun.line.capture import FrameGrabber, open_capture
from edgerun.preprocess import preprocess
from edgerun.regression import restore
from edgerun.runtime.runners import infer_chunk
from edgerun.spec import REQUIRED, Spec


class Timings(object):
    """Per-frame seconds in bounded memory, for a camera that runs for days: exact count, sum, min and max, and
    a uniform sample of at most ``keep`` values (Vitter's reservoir, algorithm R) for the percentiles. Keeping
    every value grew the process by ~16 MB per 100,000 frames (five lists of floats): 400 MB a day at 30 FPS,
    which the soak test caught."""

    def __init__(self, keep=20000, seed=0):
        self.keep = keep
        self.count = 0
        self.total = 0.0
        self.sample = []
        self.rng = np.random.RandomState(seed)

    def add(self, seconds):
        self.count += 1
        self.total += seconds
        if len(self.sample) < self.keep:
            self.sample.append(seconds)
        else:
            slot = self.rng.randint(0, self.count)
            if slot < self.keep:
                self.sample[slot] = seconds

    def mean(self):
        return self.total / self.count if self.count else None

    def percentile(self, q):
        return percentile(sorted(self.sample), q) if self.sample else None


def reject_rule(manifest, reject_class, threshold=None, precision="fp32"):
    """(threshold, where it came from) for rejecting ``reject_class``: ``--threshold`` when given, else the
    manifest's operating-point threshold when ``reject_class`` is the bundle's positive class (the one of the model
    that runs: ``precision`` int8 takes the INT8 model's own), else 0.5."""
    if threshold is not None:
        return float(threshold), "--threshold"
    decision = manifest.decision
    if (
        reject_class is not None
        and reject_class == decision.get("positive_class")
        and decision.get("threshold") is not None
    ):
        point = decision.get("operating_point") or {}
        rule = (
            "recall >= %g" % point["target_recall"]
            if point.get("target_recall") is not None
            else "false-reject <= %g" % point["max_false_reject"]
            if point.get("max_false_reject") is not None
            else ""
        )
        own = precision in (decision.get("thresholds") or {}) and precision != "fp32"
        return float(threshold_for(decision, precision)), "the bundle's operating point (%s, picked on %s%s)" % (
            rule,
            decision.get("calibration_split") or "held-out images",
            ", the %s model's own threshold" % precision.upper() if own else "",
        )
    return 0.5, "default 0.5 (the bundle has no operating point for this class)"


class _Classify(object):
    """Classification: the top class and its confidence, and the probability of the positive class (the reject
    class, else the bundle's positive class); reject when that probability reaches the threshold."""

    def __init__(self, manifest, reject_class, threshold, precision="fp32"):
        self.classes = manifest.classes
        if reject_class is not None and reject_class not in self.classes:
            raise SourceError(
                "--reject-class '%s' is not a class of this model (%s)" % (reject_class, ", ".join(self.classes))
            )
        self.reject_class = reject_class
        self.threshold, self.threshold_source = reject_rule(manifest, reject_class, threshold, precision)
        positive = reject_class if reject_class is not None else manifest.decision.get("positive_class")
        self.positive = self.classes.index(positive) if positive is not None else None
        self.header = ["class", "confidence"] + (["score_%s" % positive] if positive is not None else [])
        self.rule = None if reject_class is None else "P(%s) >= %.4f" % (reject_class, self.threshold)

    def __call__(self, outputs):
        """(CSV cells, reject, text, the frame's class probabilities): one softmax serves them all."""
        probs = softmax(outputs[:1])[0]
        label = int(probs.argmax())
        name, conf = self.classes[label], float(probs[label])
        cells = [name, "%.4f" % conf]
        reject = False
        if self.positive is not None:
            score = float(probs[self.positive])
            cells.append("%.6f" % score)
            reject = self.reject_class is not None and score >= self.threshold
        return cells, reject, "%s (%.2f)" % (name, conf), probs


class _Measure(object):
    """Regression: the values in target units; reject when the chosen target is above/below the thresholds."""

    def __init__(self, manifest, above, below, target):
        self.targets = manifest.targets
        names = manifest.classes
        if target is not None and target not in names:
            raise SourceError("--reject-target '%s' is not a target of this model (%s)" % (target, ", ".join(names)))
        self.names, self.index = names, names.index(target) if target is not None else 0
        self.above, self.below = above, below
        self.header = list(names)
        self.rule = None
        if above is not None or below is not None:
            self.rule = "%s%s%s" % (
                names[self.index],
                " > %g" % above if above is not None else "",
                " or < %g" % below if below is not None else "",
            )

    def __call__(self, outputs):
        values = restore(self.targets, outputs[:1])[0]
        value = float(values[self.index])
        reject = (self.above is not None and value > self.above) or (self.below is not None and value < self.below)
        text = ", ".join("%s=%.4g" % (n, v) for n, v in zip(self.names, values))
        return ["%.6g" % v for v in values], bool(reject), text, None


class _Score(object):
    """Anomaly: the image score of the bundle's detector; reject when it reaches the bundle's threshold (picked on
    good parts) or ``--threshold``. Every frame's score is written."""

    def __init__(self, manifest, threshold):
        decision = manifest.decision
        if threshold is not None:
            self.threshold, self.threshold_source = float(threshold), "--threshold"
        else:
            point = decision.get("operating_point") or {}
            self.threshold = float(decision["threshold"])
            self.threshold_source = "the bundle's threshold (%s)" % (
                "false-reject <= %g on good parts" % point["max_false_reject"]
                if point.get("max_false_reject") is not None
                else "recall >= %g" % point.get("target_recall")
            )
        self.header = ["score"]
        self.rule = "anomaly score >= %.4g" % self.threshold

    def __call__(self, outputs):
        score = float(np.asarray(outputs).reshape(len(outputs), -1)[0].max())
        reject = score >= self.threshold
        return ["%.6f" % score], reject, "anomaly score %.4g" % score, None


class MapSaver(object):
    """``--save-maps``: the rejected frames with their anomaly map laid over them (JET colour map, half opacity),
    ``<folder>/<frame>.png`` and a row in ``index.csv`` (frame, score), at most ``limit`` of them."""

    def __init__(self, folder, limit=200):
        self.folder, self.limit, self.saved = folder, int(limit), 0
        if not os.path.isdir(folder):
            os.makedirs(folder)
        self.index = os.path.join(folder, "index.csv")
        with open(self.index, "w") as fh:
            fh.write("frame,file,score\n")

    def add(self, frame_number, image_bgr, amap, score):
        if self.saved >= self.limit:
            return
        h, w = image_bgr.shape[:2]
        top = max(float(np.max(amap)), 1e-9)
        heat = np.clip(np.asarray(amap, dtype=np.float32) / top * 255.0, 0, 255).astype(np.uint8)
        heat = cv2.applyColorMap(cv2.resize(heat, (w, h)), cv2.COLORMAP_JET)
        image = image_bgr if image_bgr.ndim == 3 else cv2.cvtColor(image_bgr, cv2.COLOR_GRAY2BGR)
        overlay = cv2.addWeighted(image[:, :, :3], 0.5, heat, 0.5, 0)
        name = "%06d.png" % frame_number
        cv2.imwrite(os.path.join(self.folder, name), overlay)
        with open(self.index, "a") as fh:
            fh.write("%d,%s,%.6f\n" % (frame_number, name, score))
        self.saved += 1


class CameraJob(Spec):
    """What ``run_camera`` runs: the runner and the bundle's manifest, the source, when to stop, the reject rule,
    where rows and the summary go, and what watches every frame.

    A classification frame is rejected when the probability of ``reject_class`` reaches ``reject_threshold``
    (default: the bundle's operating-point threshold for its positive class, else 0.5); an anomaly frame when its
    score reaches ``reject_threshold`` (default: the bundle's threshold), its map overlay then saved by
    ``save_maps``; a regression frame when
    the value of ``reject_target`` is above ``reject_above`` or below ``reject_below``. ``on_reject(frame, text)``
    is called for each rejected frame, ``on_frame(frame, text)`` for every frame. ``loop`` plays a file again from
    its start. ``drift`` (a :class:`edgerun.line.drift.DriftWatch`), ``unsure``
    (:class:`edgerun.line.drift.UnsureFrames`) and ``soak`` (:class:`edgerun.line.soak.Soak`) watch every frame;
    their summaries join the camera's under their names. ``heartbeat`` (:class:`edgerun.line.service.Heartbeat`)
    is told the counters every frame (systemd's watchdog, the status file)."""

    FIELDS = {
        "runner": REQUIRED,
        "manifest": REQUIRED,
        "source": REQUIRED,
        "duration": None,
        "max_frames": None,
        "loop": False,  # when to stop (default: the end of the source)
        "reject_class": None,
        "reject_threshold": None,  # classification's reject rule
        "reject_above": None,
        "reject_below": None,
        "reject_target": None,  # regression's
        "csv_path": None,
        "summary_path": None,
        "on_reject": None,
        "on_frame": None,  # where verdicts go
        "opener": open_capture,
        "max_reconnects": 3,
        "reconnect_delay": 1.0,  # the source
        "drift": None,
        "unsure": None,
        "soak": None,
        "heartbeat": None,  # what watches every frame
        "save_maps": None,  # anomaly: a MapSaver for the rejected frames' map overlays
    }


def _decider(job):
    """The frame's decision: ``_Score`` for an anomaly bundle, ``_Measure`` for a regression one, ``_Classify``
    otherwise; flags of another task and watchers that need class probabilities are refused."""
    manifest = job.manifest
    if manifest.task == "anomaly":
        if job.reject_class is not None or job.reject_above is not None or job.reject_below is not None:
            raise SourceError(
                "an anomaly bundle rejects on its anomaly score at the bundle's threshold (or --threshold): drop "
                "--reject-class / --reject-above / --reject-below"
            )
        if job.drift is not None or job.unsure is not None:
            raise SourceError("the drift watch and unsure frames read class probabilities; an anomaly bundle scores")
        return _Score(manifest, job.reject_threshold)
    if job.save_maps is not None:
        raise SourceError("--save-maps saves anomaly maps: this bundle is a %s bundle" % manifest.task)
    if manifest.task == "regression":
        if job.reject_class is not None:
            raise SourceError(
                "--reject-class applies to classification bundles; this one measures %s: use "
                "--reject-above/--reject-below" % ", ".join(manifest.classes)
            )
        decide = _Measure(manifest, job.reject_above, job.reject_below, job.reject_target)
    else:
        if job.reject_above is not None or job.reject_below is not None:
            raise SourceError(
                "--reject-above/--reject-below apply to regression bundles; this one classifies: use --reject-class"
            )
        decide = _Classify(manifest, job.reject_class, job.reject_threshold, getattr(job.runner, "precision", "fp32"))
    if manifest.task == "regression" and (job.drift is not None or job.unsure is not None):
        raise SourceError(
            "the drift watch and unsure frames read class probabilities; this bundle measures %s"
            % ", ".join(manifest.classes)
        )
    return decide


class _CameraLoop(object):
    """One camera run's state: the decision, the timings of each stage, the counters and the rows written."""

    def __init__(self, job, decide, grabber, writer_fh):
        self.job, self.decide, self.grabber = job, decide, grabber
        # a fixed-batch engine (batch 4, say) takes its whole batch: one frame is padded, as validate pads its last
        # chunk
        self.fixed_batch = None if job.manifest.model.get("dynamic_batch") else job.manifest.input_shape[0]
        self.stages = {"preprocess": Timings(), "infer": Timings(), "postprocess": Timings()}
        self.totals = Timings()
        self.rejects = self.processed = 0
        self.writer_fh = writer_fh
        self.writer = csv.writer(writer_fh) if writer_fh else None
        if self.writer:
            self.writer.writerow(["frame", "time_s"] + decide.header + ["latency_ms", "reject"])
        self.started = time.perf_counter()

    def counters(self, seconds):
        drift = self.job.drift
        return {
            "source": self.job.source,
            "frames": self.processed,
            "captured": self.grabber.captured,
            "dropped": self.grabber.dropped,
            "reconnects": self.grabber.reconnects,
            "rejects": self.rejects,
            "seconds": seconds,
            "drift": (("DRIFT" if drift.warnings else "stable") if drift.n_checks else "not checked yet")
            if drift is not None
            else None,
        }

    def frame(self, frame):
        """Infer, decide, watch and write one captured frame ``(image, batch, preprocessing seconds)``."""
        job = self.job
        t1 = time.perf_counter()
        image, batch, prep_seconds = frame
        t0 = t1 - prep_seconds  # preprocessing ran in the capture thread, overlapped with the last inference
        amap = None
        if job.save_maps is not None:  # both outputs of the one inference: the score decides, the map is saved
            m = job.manifest
            outputs = job.runner.infer({m.input_name: np.ascontiguousarray(batch)})
            logits, amap = outputs[m.output_name], outputs[m.model["map_name"]]
        else:
            logits = infer_chunk(job.runner, batch, job.manifest.input_name, job.manifest.output_name, self.fixed_batch)
        t2 = time.perf_counter()
        cells, reject, text, probs = self.decide(np.asarray(logits))
        t3 = time.perf_counter()
        if job.drift is not None:
            job.drift.add(probs)
        if job.unsure is not None:
            job.unsure.add(self.processed, image, probs)
        if job.soak is not None:
            job.soak.tick(self.processed)
        self.stages["preprocess"].add(t1 - t0)
        self.stages["infer"].add(t2 - t1)
        self.stages["postprocess"].add(t3 - t2)
        self.totals.add(t3 - t0)
        if reject:
            self.rejects += 1
            if amap is not None:
                job.save_maps.add(
                    self.processed, image, np.asarray(amap)[0].reshape(np.asarray(amap).shape[-2:]), float(cells[0])
                )
            if job.on_reject:
                job.on_reject(self.processed, text)
            if job.heartbeat is not None:
                job.heartbeat.verdict(self.processed, "REJECT " + text)
        if job.on_frame:
            job.on_frame(self.processed, text)
        if self.writer:
            self.writer.writerow(
                [self.processed, "%.4f" % (t3 - self.started)] + cells + ["%.3f" % ((t3 - t0) * 1e3), int(reject)]
            )
            self.writer_fh.flush()
        self.processed += 1
        if job.heartbeat is not None:
            job.heartbeat.tick(self.counters(t3 - self.started))

    def summary(self, elapsed, error):
        job, grabber, totals, stages = self.job, self.grabber, self.totals, self.stages
        return {
            "source": job.source,
            "frames_processed": self.processed,
            "frames_captured": grabber.captured,
            "frames_dropped": grabber.dropped,
            "reconnects": grabber.reconnects,
            "seconds": elapsed,
            "end_to_end_fps": self.processed / elapsed if elapsed > 0 else 0.0,
            "latency_ms": {
                "p50": totals.percentile(50) * 1e3 if totals.count else None,
                "p95": totals.percentile(95) * 1e3 if totals.count else None,
                "of": ("every frame" if totals.count <= totals.keep else "a uniform sample of %d frames" % totals.keep),
            },
            "stages_ms": dict((k, (v.mean() * 1e3 if v.count else None)) for k, v in stages.items()),
            "model_only_fps": (stages["infer"].count / stages["infer"].total) if stages["infer"].total else None,
            # one frame per inference: a fixed batch above 1 computes (batch - 1) padded copies each time
            "engine_batch": self.fixed_batch or 1,
            "rejects": self.rejects,
            "reject_class": job.reject_class,
            "reject_rule": self.decide.rule,
            "reject_threshold": getattr(self.decide, "threshold", None)
            if job.reject_class is not None or job.manifest.task == "anomaly"
            else None,
            "threshold_source": getattr(self.decide, "threshold_source", None)
            if job.reject_class is not None or job.manifest.task == "anomaly"
            else None,
            "maps_saved": job.save_maps.saved if job.save_maps is not None else None,
            "task": job.manifest.task,
            "error": str(error) if error else None,
            "csv": job.csv_path,
            "loops": grabber.loops if job.loop else None,
        }


def run_camera(job):
    """Classify (or, for a regression bundle, measure) frames of ``job.source`` until ``job.duration`` s,
    ``job.max_frames`` or the end of a file; returns the summary (see :class:`CameraJob`).

    Per-frame rows (frame, time, class, confidence and the positive class's probability, or the target values;
    latency, reject) go to ``job.csv_path`` as they happen, so a crash or a lost camera loses nothing already
    processed.
    """
    decide = _decider(job)
    spec = job.manifest.preprocess
    grabber = FrameGrabber(
        job.source,
        job.opener,
        job.max_reconnects,
        job.reconnect_delay,
        transform=lambda frame: preprocess([frame], spec, input_order="BGR"),
        loop=job.loop,
        on_event=job.soak.event if job.soak is not None else None,
    ).start()
    error = None
    loop = _CameraLoop(job, decide, grabber, open(job.csv_path, "w") if job.csv_path else None)
    try:
        while True:
            if job.duration and time.perf_counter() - loop.started >= job.duration:
                break
            if job.max_frames and loop.processed >= job.max_frames:
                break
            try:
                frame = grabber.latest()
            except SourceError as exc:
                error = exc
                break
            if frame is None:
                break
            loop.frame(frame)
    finally:
        elapsed = time.perf_counter() - loop.started
        grabber.stop()
        if loop.writer_fh:
            loop.writer_fh.close()
    summary = loop.summary(elapsed, error)
    _finish_watchers(job, loop, summary, elapsed)
    if job.summary_path:
        import json

        with open(job.summary_path, "w") as fh:
            json.dump(summary, fh, indent=2, sort_keys=True)
    if error is not None:
        raise SourceError(
            "%s; %d frame(s) were classified before that%s"
            % (error, loop.processed, " and are saved in %s" % job.csv_path if job.csv_path else "")
        )
    return summary


def _finish_watchers(job, loop, summary, elapsed):
    """The heartbeat's last word, and the watchers' summaries joined to the camera's."""
    if job.heartbeat is not None:
        job.heartbeat.write(dict(loop.counters(elapsed), ended=True, error=summary["error"]))
        job.heartbeat.stopping()
    if job.drift is not None:
        summary["drift"] = job.drift.summary()
    if job.unsure is not None:
        job.unsure.close()
        summary["unsure"] = job.unsure.summary()
    if job.soak is not None:
        summary["soak"] = job.soak.summary(loop.processed)
