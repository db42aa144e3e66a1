"""What a board's results must show before its row says PASS: absence of evidence is a FAIL.

A board sends back the JSON files its checks wrote (validate.json, bench.json, camera.json). Each is read as the
board could have written it wrongly (a crash before writing, a list, a string where a number goes, a file forged
by whoever controls the board): a file that is missing, malformed or of the wrong shape is that board's FAIL, with
the file named, and never an exception that ends the other boards' deploys. A board passes only on an explicit
PASS from every check it was asked to run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from edgedistill.errors import EdgedistillError


class BadEvidence(EdgedistillError):
    """A board's result file is missing or cannot be what edgerun writes."""


# per check: the verdict values edgerun writes, and where the verdict sits
VERDICTS = {
    "validate": ({"PASS", "FAIL"}, ("status",)),
    "bench": ({"PASS", "FAIL"}, ("verdict", "overall")),
    "camera": ({"PASS", "FAIL", "SKIP"}, ("verdict",)),
}
MAX_JSON_BYTES = 16 << 20  # a result file is a few kB; anything near this is not one


def read_results(files: Sequence[Path]) -> tuple[dict[str, dict], list[str]]:
    """({check: its JSON object} for every well-formed .json among ``files``, [what was wrong with the others])."""
    results, problems = {}, []
    for path in files:
        path = Path(path)
        if path.suffix != ".json":
            continue
        try:
            if path.stat().st_size > MAX_JSON_BYTES:
                raise BadEvidence(f"{path.name} is {path.stat().st_size >> 20} MB, not a result file")
            data = json.loads(path.read_text(), parse_constant=_no_constant)
            if not isinstance(data, dict):
                raise BadEvidence(f"{path.name} is a JSON {type(data).__name__}, not an object")
            if path.stem in VERDICTS:
                verdict_of(path.stem, data)
            results[path.stem] = data
        except (BadEvidence, ValueError, UnicodeDecodeError) as exc:
            problems.append(f"{path.name} from the board is malformed ({exc})")
    return results, problems


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def verdict_of(check: str, data: dict) -> str:
    """The verdict a check's JSON states, checked against the values edgerun writes."""
    allowed, where = VERDICTS[check]
    value: Any = data
    for key in where:
        value = value.get(key) if isinstance(value, dict) else None
    if value not in allowed:
        raise BadEvidence(f"its verdict {'.'.join(where)} is {value!r}, not one of {', '.join(sorted(allowed))}")
    return value


def board_verdict(results: dict[str, dict], problems: list[str], required: Sequence[str], rcs: dict) -> tuple:
    """(PASS or FAIL, why) for a board: PASS only when every ``required`` check left a well-formed JSON whose
    verdict is PASS (the camera's SKIP, with no FPS target, counts as run), and no file was malformed. ``rcs``:
    each check's exit code, to say how a check that left no file ended."""
    reasons = list(problems)
    for check in required:
        if check not in results:
            rc = rcs.get(check)
            how = f"it exited {rc}" if rc not in (None, 0) else "it wrote none"
            reasons.append(f"no {check}.json from the board ({how}): no evidence is a FAIL")
            continue
        verdict = verdict_of(check, results[check])
        if verdict == "FAIL":
            reasons.append(f"FAIL in {check}")
    if not reasons:
        return "PASS", ""
    return "FAIL", "; ".join(reasons)


def number(value: Any) -> Optional[float]:
    """A figure for the fleet table: a real, finite number, else None (a string "12" is not one)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def fleet_facts(results: dict) -> dict:
    """The fleet table's cells from a board's validate/bench/camera JSON (figures that are not numbers: None)."""
    facts: dict[str, Any] = {}
    bench = _obj(results.get("bench"))
    result = _obj(bench.get("result"))
    if result:
        lat = _obj(result.get("latency_ms"))
        batch = number(result.get("batch")) or 1
        p50, p99 = number(lat.get("p50")), number(lat.get("p99"))
        facts.update(
            {
                "fps": number(result.get("throughput_fps")),
                "fps_p50": 1000.0 * batch / p50 if p50 else None,
                "fps_p99": 1000.0 * batch / p99 if p99 else None,
                "memory_mb": number(_obj(result.get("memory")).get("total_mb")),
                "memory_method": _text(_obj(result.get("memory")).get("device_method")),
                "power_mw": number(_obj(result.get("tegrastats")).get("power_mw_mean")),
                "bench_verdict": _text(_obj(bench.get("verdict")).get("overall")),
                "runner": _text(result.get("runner")),
                "frame_size": _text(_obj(result.get("feed")).get("frame_size")),
            }
        )
    validate = _obj(results.get("validate"))
    if validate:
        facts.update(
            {
                "device_top1": number(validate.get("top1")),
                "host_top1": number(validate.get("host_fp32_top1")),
                "validate": _text(validate.get("status")),
            }
        )
    camera = _obj(results.get("camera"))
    if camera:
        facts.update(
            {
                "camera_fps": number(camera.get("end_to_end_fps")),
                "camera_dropped": number(camera.get("frames_dropped")),
                "camera_error": _text(camera.get("error")),
            }
        )
    return facts


def _obj(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> Optional[str]:
    return None if value is None else str(value)[:500]
