"""The line camera's capture: CSI (nvarguscamerasrc), USB/V4L2, RTSP or a video file, read in a thread of its own.

A live source keeps only the newest frame (a classifier on a line must judge the part in front of the camera now,
not a queue of old frames); frames it overwrote are counted as dropped. A video file is read without dropping
(and, with ``loop``, played again from its start). Preprocessing runs in the capture thread too, so decoding and
preprocessing of the next frame overlap inference of this one (OpenCV and numpy release the GIL). A lost source
is reopened a bounded number of times, each attempt reported to ``on_event``.
"""

import os
import threading
import time

import cv2

from edgerun.errors import SourceError


def csi_pipeline(sensor_id, capture_size=(1280, 720), fps=30, output_size=None, flip=0):
    """GStreamer pipeline for a CSI camera on Jetson: nvarguscamerasrc, hardware scaling in nvvidconv."""
    w, h = capture_size
    ow, oh = output_size or capture_size
    return (
        "nvarguscamerasrc sensor-id=%d ! video/x-raw(memory:NVMM), width=%d, height=%d, framerate=%d/1, "
        "format=NV12 ! nvvidconv flip-method=%d ! video/x-raw, width=%d, height=%d, format=BGRx ! "
        "videoconvert ! video/x-raw, format=BGR ! appsink drop=true max-buffers=1 sync=false"
        % (int(sensor_id), w, h, int(fps), int(flip), ow, oh)
    )


def describe_source(source):
    """(kind, argument for cv2.VideoCapture, backend) for csi://N, usb://N, /dev/videoN, rtsp://..., a file."""
    if source.startswith("csi://"):
        return "csi", source[len("csi://") :] or "0", cv2.CAP_GSTREAMER
    if source.startswith("usb://"):
        return "usb", int(source[len("usb://") :] or 0), cv2.CAP_V4L2
    if source.startswith("/dev/video"):
        return "usb", source, cv2.CAP_V4L2
    if source.startswith(("rtsp://", "rtsps://", "http://", "https://")):
        return "stream", source, cv2.CAP_FFMPEG
    if not os.path.isfile(source):
        raise SourceError(
            "source '%s' is neither csi://N, usb://N, /dev/videoN, rtsp://... nor an existing video file" % source
        )
    return "file", source, cv2.CAP_ANY


def opencv_has_gstreamer():
    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GStreamer:"):
            return "YES" in line
    return False


def open_capture(source, output_size=None):
    """cv2.VideoCapture for a source string; raises SourceError when it does not open."""
    kind, arg, backend = describe_source(source)
    if kind == "csi":
        if not opencv_has_gstreamer():
            raise SourceError(
                "this OpenCV has no GStreamer, which CSI cameras need: use JetPack's OpenCV "
                "(python3-opencv), not pip's opencv-python, which shadows it"
            )
        arg = csi_pipeline(int(arg), output_size=output_size)
    cap = cv2.VideoCapture(arg, backend)
    if not cap.isOpened():
        raise SourceError("cannot open source '%s' (%s)" % (source, kind))
    return cap


class FrameGrabber(object):
    """Reads a capture in a thread; ``latest()`` returns the newest frame not yet taken."""

    def __init__(
        self,
        source,
        opener=open_capture,
        max_reconnects=3,
        reconnect_delay=1.0,
        drop=None,
        transform=None,
        loop=False,
        on_event=None,
    ):
        self.source = source
        self.loop = loop  # a file played again from the start at its end (soak tests on a recorded line)
        self.loops = 0
        self.on_event = on_event  # (kind, text): reconnects and loops, for the soak's event log
        self.opener = opener
        self.max_reconnects = max_reconnects
        self.reconnect_delay = reconnect_delay
        self.kind = describe_source(source)[0] if isinstance(source, str) else "custom"
        self.drop = (self.kind != "file") if drop is None else drop
        self.transform = transform  # applied in the capture thread: (frame) -> (frame, prepared, seconds)
        self.cond = threading.Condition()
        self.frame = None
        self.frame_index = -1
        self.taken_index = -1
        self.captured = 0
        self.dropped = 0
        self.reconnects = 0
        self.ended = False
        self.error = None
        self.running = False
        self.cap = None

    def start(self):
        self.cap = self.opener(self.source)
        self.running = True
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        return self

    def _at_end_of_file(self):
        if self.kind != "file" or self.cap is None:
            return False
        total = self.cap.get(cv2.CAP_PROP_FRAME_COUNT)
        return total > 0 and self.cap.get(cv2.CAP_PROP_POS_FRAMES) >= total

    def _event(self, kind, text):
        if self.on_event is not None:
            self.on_event(kind, text)

    def _reconnect(self):
        while self.reconnects < self.max_reconnects and self.running:
            self.reconnects += 1
            time.sleep(self.reconnect_delay)
            try:
                if self.cap is not None:
                    self.cap.release()
                self.cap = self.opener(self.source)
                self._event("reconnect", "source '%s' reopened (attempt %d)" % (self.source, self.reconnects))
                return True
            except SourceError as exc:
                self._event("reconnect_failed", "attempt %d: %s" % (self.reconnects, exc))
                continue
        return False

    def _rewind(self):
        """A looped file: back to its first frame (reopened where seeking is refused)."""
        self.loops += 1
        if not self.cap.set(cv2.CAP_PROP_POS_FRAMES, 0):
            self.cap.release()
            self.cap = self.opener(self.source)

    def _loop(self):
        while self.running:
            ok, frame = self.cap.read()
            if not ok or frame is None:
                if self._at_end_of_file() or (self.loop and self.kind == "file"):
                    if self.loop and self.captured > 0:
                        self._rewind()
                        continue
                    self._finish(None)
                    return
                if not self._reconnect():
                    self._finish(
                        SourceError(
                            "source '%s' was lost and %d reconnect attempt(s) failed" % (self.source, self.reconnects)
                        )
                    )
                    return
                continue
            if self.transform is not None:
                start = time.perf_counter()
                frame = (frame, self.transform(frame), time.perf_counter() - start)
            with self.cond:
                while not self.drop and self.frame_index > self.taken_index and self.running:
                    self.cond.wait(0.1)  # a file: wait until the consumer took the previous frame
                if not self.running:  # stopped while waiting: the frame was never offered, not dropped
                    return
                if self.frame_index > self.taken_index:
                    self.dropped += 1
                self.frame = frame
                self.frame_index += 1
                self.captured += 1
                self.cond.notify_all()

    def _finish(self, error):
        with self.cond:
            self.ended = True
            self.error = error
            self.cond.notify_all()

    def latest(self, timeout=5.0):
        """The newest untaken frame; None at the end of the stream; raises the source's error if it died."""
        deadline = time.time() + timeout
        with self.cond:
            while self.frame_index <= self.taken_index and not self.ended:
                remaining = deadline - time.time()
                if remaining <= 0:
                    raise SourceError("no frame from '%s' for %.1f s" % (self.source, timeout))
                self.cond.wait(remaining)
            if self.frame_index > self.taken_index:
                self.taken_index = self.frame_index
                self.cond.notify_all()
                return self.frame
            if self.error is not None:
                raise self.error
            return None

    def stop(self):
        with self.cond:
            self.running = False
            self.cond.notify_all()
        if self.cap is not None:
            self.thread.join(timeout=2)
            self.cap.release()
