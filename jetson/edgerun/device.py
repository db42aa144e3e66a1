"""What the device is and what state it is in: board, JetPack/L4T, TensorRT, CUDA, memory, clocks, power.

Every reader returns None (never raises) when a file or tool is absent, so the same code reports on a
workstation, a container and a Jetson. Sources: /proc/device-tree/model, /etc/nv_tegra_release,
/proc/meminfo, /proc/self/status, cpufreq and devfreq in /sys, ``nvpmodel -q`` and ``tegrastats``.
"""

import glob
import os
import re
import subprocess
import threading
import time


def _read(path):
    try:
        with open(path) as fh:
            return fh.read().strip().strip("\x00")
    except (OSError, IOError):
        return None


BOARD_ENV = "EDGERUN_BOARD"
# Docker masks /proc/device-tree: mount the model there read-only, e.g.
#   docker run ... -v /proc/device-tree/model:/etc/edgerun/board-model:ro
BOARD_FILE = "/etc/edgerun/board-model"


def board_model(environ=None, root="/"):
    """The board's model ('NVIDIA Jetson Nano Developer Kit'): /proc/device-tree/model, else $EDGERUN_BOARD, else
    the mounted /etc/edgerun/board-model (containers cannot see the device tree); None when none says."""
    environ = os.environ if environ is None else environ
    return (
        _read(os.path.join(root, "proc/device-tree/model"))
        or (environ.get(BOARD_ENV) or "").strip()
        or _read(os.path.join(root, BOARD_FILE.lstrip("/")))
        or None
    )


def is_tegra(root="/"):
    """A Jetson (L4T), seen even from a container: its release file or the SoC family say so."""
    family = _read(os.path.join(root, "sys/devices/soc0/family")) or ""
    return os.path.exists(os.path.join(root, "etc/nv_tegra_release")) or "tegra" in family.lower()


def board_label(environ=None, root="/"):
    """How reports name this machine: the board model; a Jetson whose model cannot be seen says so (with the mount
    that fixes it); anything else is this host."""
    board = board_model(environ, root)
    if board:
        return board
    if is_tegra(root):
        return "a Jetson of unknown model (in a container: mount /proc/device-tree/model at %s or set $%s)" % (
            BOARD_FILE,
            BOARD_ENV,
        )
    return None


def l4t_release():
    """'# R32 (release), REVISION: 7.1, ...' -> 'R32.7.1'."""
    text = _read("/etc/nv_tegra_release")
    if not text:
        return None
    match = re.search(r"R(\d+) \(release\), REVISION: ([\d.]+)", text)
    return "R%s.%s" % match.groups() if match else None


def tensorrt_version():
    try:
        import tensorrt
    except ImportError:
        return None
    return getattr(tensorrt, "__version__", None)  # None for type stubs alone (a namespace package)


def cuda_version():
    for path in ("/usr/local/cuda/version.txt", "/usr/local/cuda/version.json"):
        text = _read(path)
        if text:
            match = re.search(r"(\d+\.\d+(\.\d+)?)", text)
            if match:
                return match.group(1)
    return None


def _kb_fields(path, keys):
    """'Key:   1234 kB' lines of a /proc file -> {key: MB} for the wanted keys."""
    out = {}
    for line in (_read(path) or "").splitlines():
        key, _, rest = line.partition(":")
        if key in keys and rest.split():
            out[key] = int(rest.split()[0]) / 1024.0
    return out


def meminfo():
    """MemTotal/MemAvailable/SwapTotal/SwapFree in MB from /proc/meminfo."""
    return _kb_fields("/proc/meminfo", ("MemTotal", "MemAvailable", "SwapTotal", "SwapFree"))


def process_memory_mb():
    """(current RSS, peak RSS) of this process in MB, from /proc/self/status (VmRSS, VmHWM)."""
    values = _kb_fields("/proc/self/status", ("VmRSS", "VmHWM"))
    return values.get("VmRSS"), values.get("VmHWM")


def reset_peak_memory(path="/proc/self/clear_refs"):
    """Restart VmHWM from the current RSS (Linux >= 4.0: '5' to clear_refs), so that the next peak read is the
    peak since now, not since start-up; False where the kernel or a sandbox refuses it."""
    try:
        with open(path, "w") as fh:
            fh.write("5")
        return True
    except (OSError, IOError):
        return False


NVMAP_CLIENTS = "/sys/kernel/debug/nvmap/iovmm/clients"


def nvmap_process_mb(pid=None, path=None):
    """This process's nvmap allocations in MB (CUDA and TensorRT memory on a Jetson come from nvmap, outside
    the resident set): the SIZE column of its line in the nvmap clients table (debugfs, root only). None
    where unreadable. Lines look like 'user  python3  12345  52400K'."""
    pid = os.getpid() if pid is None else pid
    path = NVMAP_CLIENTS if path is None else path
    total, found = 0.0, False
    for line in (_read(path) or "").splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[-2] == str(pid):
            match = re.match(r"(\d+)([KMG]?)$", parts[-1])
            if match:
                total += (
                    int(match.group(1)) / {"K": 1024.0, "M": 1.0, "G": 1 / 1024.0, "": 1024.0 * 1024}[match.group(2)]
                )
                found = True
    return total if found else None


def nvmap_memory():
    """A runner's device memory as nvmap counts it ({'mb', 'method'}), or None where the table is unreadable."""
    mb = nvmap_process_mb()
    return None if mb is None else {"mb": mb, "method": "nvmap per-process allocations (debugfs iovmm clients)"}


def nvpmodel_mode():
    try:
        out = subprocess.check_output(["nvpmodel", "-q"], stderr=subprocess.STDOUT, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"NV Power Mode: (\S+)", out.decode("utf-8", "replace"))
    return match.group(1) if match else None


# devfreq names of Jetson GPUs: 57000000.gpu (Nano, gm20b), 17000000.gp10b (TX2), 17000000.gv11b (Xavier),
# 17000000.ga10b (Orin, JetPack 5) and 17000000.gpu (Orin, JetPack 6)
GPU_DEVFREQ = re.compile(r"(gpu|gm20b|gp10b|gv11b|ga10b)$")


def gpu_devfreq_folders(root="/"):
    """The GPU's devfreq folders: /sys/class/devfreq/* entries named like a Jetson GPU (every generation),
    then the older device paths."""
    found = [
        f
        for f in sorted(glob.glob(os.path.join(root, "sys/class/devfreq/*")))
        if GPU_DEVFREQ.search(os.path.basename(f))
    ]
    found += glob.glob(os.path.join(root, "sys/devices/gpu.0/devfreq/*"))
    found += glob.glob(os.path.join(root, "sys/devices/platform/*gpu*/devfreq/*"))
    return found


def clocks(root="/"):
    """CPU and GPU current vs maximum frequency; ``maxed`` is False when any runs below its maximum
    (jetson_clocks not applied), None when unknown."""
    result = {"cpu": [], "gpu": None, "maxed": None}
    for folder in sorted(glob.glob(os.path.join(root, "sys/devices/system/cpu/cpu[0-9]*/cpufreq"))):
        # the ceiling is the policy's (scaling_max_freq), which a lower nvpmodel mode sets below the hardware's
        # (cpuinfo_max_freq): jetson_clocks pins the minimum to the former
        cur, hw_top = _read(os.path.join(folder, "scaling_cur_freq")), _read(os.path.join(folder, "cpuinfo_max_freq"))
        top = _read(os.path.join(folder, "scaling_max_freq")) or hw_top
        low = _read(os.path.join(folder, "scaling_min_freq"))
        if cur and top:
            result["cpu"].append(
                {
                    "cur_khz": int(cur),
                    "max_khz": int(top),
                    "min_khz": int(low) if low else None,
                    "hw_max_khz": int(hw_top) if hw_top else None,
                }
            )
    for folder in gpu_devfreq_folders(root):
        cur, top = _read(os.path.join(folder, "cur_freq")), _read(os.path.join(folder, "max_freq"))
        low = _read(os.path.join(folder, "min_freq"))
        if cur and top:
            result["gpu"] = {"cur_hz": int(cur), "max_hz": int(top), "min_hz": int(low) if low else None}
            break
    # jetson_clocks pins the minimum frequency to the maximum
    pinned = [c["min_khz"] == c["max_khz"] for c in result["cpu"] if c["min_khz"]]
    if result["gpu"] and result["gpu"]["min_hz"]:
        pinned.append(result["gpu"]["min_hz"] == result["gpu"]["max_hz"])
    if pinned:
        result["maxed"] = all(pinned)
    return result


def temperatures(root="/"):
    """{thermal zone type: degrees C} from /sys/class/thermal (Jetson: CPU-therm, GPU-therm, AO-therm, ...)."""
    out = {}
    for zone in sorted(glob.glob(os.path.join(root, "sys/class/thermal/thermal_zone*"))):
        kind, temp = _read(os.path.join(zone, "type")), _read(os.path.join(zone, "temp"))
        try:
            out[kind or os.path.basename(zone)] = int(temp) / 1000.0
        except (TypeError, ValueError):  # a zone that reads no number (a sensor switched off)
            continue
    return out


def throttled(clock_state):
    """True when clocks were pinned at their maximum (jetson_clocks) and one now runs below it: the thermal or
    power governor lowered it; None when the clocks are not pinned (a governor may lower them at will)."""
    if not clock_state.get("maxed"):
        return None
    below = [c["cur_khz"] < c["max_khz"] for c in clock_state["cpu"]]
    gpu = clock_state.get("gpu")
    if gpu:
        below.append(gpu["cur_hz"] < gpu["max_hz"])
    return any(below)


def device_info():
    from edgerun.profiles import match_device

    mem = meminfo()
    info = {
        "board": board_model(),
        "l4t": l4t_release(),
        "tensorrt": tensorrt_version(),
        "cuda": cuda_version(),
        "memory_total_mb": round(mem.get("MemTotal", 0)),
        "memory_available_mb": round(mem.get("MemAvailable", 0)),
        "swap_total_mb": round(mem.get("SwapTotal", 0)),
        "nvpmodel": nvpmodel_mode(),
        "clocks": clocks(),
        "gpu": None,
    }
    gpu = gpu_properties()
    if gpu:
        info["gpu"] = gpu
        profile = match_device(gpu["compute_capability"], info["memory_total_mb"])
        info["profile"] = profile["name"] if profile else None
    return info


def gpu_properties():
    """Name and compute capability of CUDA device 0 through pycuda; None without pycuda or a GPU."""
    try:
        import pycuda.driver as cuda

        cuda.init()
        dev = cuda.Device(0)
    except Exception:  # ImportError, or pycuda's LogicError/RuntimeError when no device: all mean "no GPU"
        return None
    major, minor = dev.compute_capability()
    try:  # a Jetson's GPU shares the board's DRAM with the CPU
        integrated = bool(dev.get_attribute(cuda.device_attribute.INTEGRATED))
    except (AttributeError, cuda.Error):
        integrated = is_tegra()
    return {
        "name": dev.name(),
        "compute_capability": "%d.%d" % (major, minor),
        "memory_mb": dev.total_memory() // (1024 * 1024),
        "integrated": integrated,
    }


TEGRA_RAM = re.compile(r"RAM (\d+)/(\d+)MB")
TEGRA_GR3D = re.compile(r"GR3D_FREQ (\d+)%")
# every power rail, current/average: 'POM_5V_IN 1958/1958' on JetPack 4 (mW, no unit written), 'VDD_IN 4567mW/4567mW'
# on JetPack 5 and 6; RAM and SWAP look alike but end in MB
TEGRA_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*)\s+(\d+)(?:mW)?/(\d+)(?:mW)?(?![A-Za-z0-9])")
NOT_RAILS = ("RAM", "SWAP", "IRAM")
# the board's own input rail where it has one (Nano: POM_5V_IN; Xavier NX, Orin NX and Orin Nano: VDD_IN); AGX
# Xavier (GPU CPU SOC CV VDDRQ SYS5V) and AGX Orin (VDD_GPU_SOC VDD_CPU_CV VIN_SYS_5V0 VDDQ_VDD2_1V8AO) have none,
# and their total is the sum of their rails, as jtop computes it (VIN_SYS_5V0 alone is one 5 V rail, not the input)
INPUT_RAILS = ("VDD_IN", "POM_5V_IN")


def parse_tegrastats(line):
    """One tegrastats line -> {'ram_used_mb', 'ram_total_mb', 'gpu_load', 'power_mw'} (keys when present)."""
    out = {}
    match = TEGRA_RAM.search(line)
    if match:
        out["ram_used_mb"], out["ram_total_mb"] = int(match.group(1)), int(match.group(2))
    match = TEGRA_GR3D.search(line)
    if match:
        out["gpu_load"] = int(match.group(1))
    rails = [(m.group(1), int(m.group(2))) for m in TEGRA_RAIL.finditer(line) if m.group(1) not in NOT_RAILS]
    if rails:
        named = dict(rails)
        total = next((r for r in INPUT_RAILS if r in named), None)
        if total:
            out["power_mw"], out["power_rail"] = named[total], total
        else:
            out["power_mw"], out["power_rail"] = sum(v for _, v in rails), "+".join(n for n, _ in rails)
    return out


class TegraStats(object):
    """Samples ``tegrastats`` in the background while a benchmark runs; a no-op where it is absent."""

    def __init__(self, interval_ms=100, command="tegrastats"):
        self.interval_ms = interval_ms
        self.command = command
        self.samples = []
        self.proc = None
        self.thread = None

    def __enter__(self):
        try:
            self.proc = subprocess.Popen(
                [self.command, "--interval", str(self.interval_ms)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
            )
        except OSError:
            self.proc = None
            return self
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        return self

    def _read(self):
        for raw in iter(self.proc.stdout.readline, b""):
            sample = parse_tegrastats(raw.decode("utf-8", "replace"))
            if sample:
                sample["t"] = time.time()
                self.samples.append(sample)

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.thread.join(timeout=2)

    @property
    def available(self):
        return self.proc is not None

    def summary(self):
        if not self.samples:
            return None
        out = {"samples": len(self.samples)}
        for key in ("ram_used_mb", "gpu_load", "power_mw"):
            values = [s[key] for s in self.samples if key in s]
            if values:
                out[key + "_max"] = max(values)
                out[key + "_mean"] = round(sum(values) / float(len(values)), 1)
        rails = [s["power_rail"] for s in self.samples if "power_rail" in s]
        if rails:
            out["power_rail"] = rails[0]
        return out
