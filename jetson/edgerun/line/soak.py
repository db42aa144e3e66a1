"""Soak: does the line's process hold steady for a day? Memory, temperature and clocks sampled while the camera
runs, and the slope of memory over time and over frames (a leak shows as a steady climb; a one-off growth as a
step that the slope after warm-up ignores).

The slope is a least-squares line through the samples after the first ``warmup_share`` of the run (caches,
allocators and TensorRT's first inferences grow memory once at the start), in MB per hour and MB per 10,000
frames; ``max_slope_mb`` (per 10,000 frames) turns it into a verdict. Python 3.6, numpy only.
"""

import time

import numpy as np

from edgerun import device


def slope(xs, ys):
    """Least-squares slope of ys over xs; None with fewer than 3 points or no spread in xs."""
    pairs = [(x, y) for x, y in zip(xs, ys) if y is not None]
    if len(pairs) < 3:
        return None
    x = np.array([p[0] for p in pairs], dtype=np.float64)
    y = np.array([p[1] for p in pairs], dtype=np.float64)
    if np.ptp(x) == 0:
        return None
    return float(np.polyfit(x, y, 1)[0])


class Soak(object):
    """Call ``tick(frame_index)`` every frame; a sample is taken every ``interval_s`` seconds (and at the first
    and last frame). ``device_memory`` is the runner's measurement (``runner.device_memory``) or None."""

    def __init__(
        self,
        interval_s=60.0,
        device_memory=None,
        max_slope_mb=1.0,
        warmup_share=0.1,
        root="/",
        clock=time.time,
        max_samples=100000,
    ):
        self.interval_s = float(interval_s)
        self.device_memory = device_memory
        self.max_slope_mb = float(max_slope_mb)
        self.warmup_share = float(warmup_share)
        self.root = root
        self.clock = clock
        self.samples = []
        self.events = []
        self.max_samples = max_samples
        self.started = None
        self.next_at = None
        self.last_frame = None

    def tick(self, frame_index):
        now = self.clock()
        self.last_frame = frame_index
        if self.started is None:
            self.started = now
            self.next_at = now
        if now >= self.next_at:
            self.sample(frame_index, now)
            self.next_at = now + self.interval_s

    def event(self, kind, text):
        """A reconnect, a drift warning: kept with the time and frame it happened at."""
        now = self.clock()
        self.events.append(
            {
                "t_s": round(now - (self.started if self.started is not None else now), 3),
                "frame": self.last_frame,
                "kind": kind,
                "text": text,
            }
        )

    def sample(self, frame_index, now=None):
        now = self.clock() if now is None else now
        rss, _peak = device.process_memory_mb()
        dev = None
        if self.device_memory is not None:
            measured = self.device_memory()
            dev = measured.get("mb") if isinstance(measured, dict) else measured
        temps = device.temperatures(self.root)
        state = device.clocks(self.root)
        gpu = state.get("gpu")
        row = {
            "t_s": round(now - self.started, 3),
            "frame": int(frame_index),
            "rss_mb": rss,
            "device_mb": dev,
            "temperature_c": max(temps.values()) if temps else None,
            "gpu_mhz": gpu["cur_hz"] / 1e6 if gpu else None,
            "throttled": device.throttled(state),
        }
        if len(self.samples) >= self.max_samples:  # a week at one sample a second: thin the oldest half
            self.samples = self.samples[::2]
        self.samples.append(row)
        return row

    def _fit(self, key):
        if not self.samples:
            return {"per_hour": None, "per_10k_frames": None}
        end_t, end_f = self.samples[-1]["t_s"], self.samples[-1]["frame"]
        kept = [
            s for s in self.samples if s["t_s"] >= self.warmup_share * end_t and s["frame"] >= self.warmup_share * end_f
        ]
        per_s = slope([s["t_s"] for s in kept], [s[key] for s in kept])
        per_frame = slope([s["frame"] for s in kept], [s[key] for s in kept])
        return {
            "per_hour": per_s * 3600 if per_s is not None else None,
            "per_10k_frames": per_frame * 1e4 if per_frame is not None else None,
            "samples": len(kept),
        }

    def summary(self, frames):
        if self.samples and self.samples[-1]["frame"] != frames - 1 and frames:
            self.sample(frames - 1)
        rss, dev = self._fit("rss_mb"), self._fit("device_mb")
        temps = [s["temperature_c"] for s in self.samples if s["temperature_c"] is not None]
        leak = rss["per_10k_frames"]
        if leak is None:
            verdict, why = "SKIP", "too few samples after warm-up for a slope (run longer or lower --soak-interval)"
        elif leak < self.max_slope_mb and (dev["per_10k_frames"] is None or dev["per_10k_frames"] < self.max_slope_mb):
            verdict, why = "PASS", "memory slope under %.2f MB per 10,000 frames" % self.max_slope_mb
        else:
            verdict, why = (
                "FAIL",
                "memory grows: RSS %.3f MB per 10,000 frames%s (limit %.2f)"
                % (
                    leak,
                    "" if dev["per_10k_frames"] is None else ", device %.3f" % dev["per_10k_frames"],
                    self.max_slope_mb,
                ),
            )
        return {
            "interval_s": self.interval_s,
            "samples": len(self.samples),
            "frames": frames,
            "warmup_share": self.warmup_share,
            "rss_slope_mb": rss,
            "device_slope_mb": dev,
            "rss_mb_first": self.samples[0]["rss_mb"] if self.samples else None,
            "rss_mb_last": self.samples[-1]["rss_mb"] if self.samples else None,
            "temperature_c_max": max(temps) if temps else None,
            "throttled_samples": sum(1 for s in self.samples if s["throttled"]),
            "events": self.events,
            "verdict": verdict,
            "why": why,
            "series": self.samples,
        }
