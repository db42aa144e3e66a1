"""Runs of one recipe side by side (``edgedistill compare``): each run's figures, then mean ± std over the runs."""

from __future__ import annotations

import statistics
from typing import Any, Sequence

from edgedistill.errors import EdgedistillError
from edgedistill.judge.summary import metric_title


def compare_text(summaries: Sequence[dict[str, Any]], names: Sequence[str]) -> str:
    """Runs of one recipe side by side (seeds): top-1s, retention, KD gain, p; then mean ± std over the runs
    (regression runs: R², retention of R², KD gain in MAE)."""
    tasks = {s.get("task", "classification") for s in summaries}
    if len(tasks) > 1:
        raise EdgedistillError(
            "compare: these runs mix classification and regression summaries; compare runs of one recipe"
        )
    if tasks == {"regression"}:
        lines = [
            f"{'run':28} {'seed':>4} {'teacher R2':>10} {'student R2':>10} {'baseline R2':>11} {'retention':>9} "
            f"{'MAE gain':>9}"
        ]
        for name, s in zip(names, summaries):
            lines.append(
                f"{name[-28:]:28} {s.get('seed', '-')!s:>4} {s['teacher']['r2']:10.4f} "
                f"{s['student']['r2']:10.4f} {s['baseline']['r2']:11.4f} {100 * s['retention']:8.1f}% "
                f"{s['kd_gain']:+9.4g}"
            )
        gains = [s["kd_gain"] for s in summaries]
        lines += [
            "",
            f"mean over {len(summaries)} run(s): retention "
            f"{statistics.mean(100 * s['retention'] for s in summaries):.1f}%, KD gain (baseline MAE - "
            f"student MAE) {statistics.mean(gains):+.4g}",
        ]
        return "\n".join(lines)

    metrics_used = {(s.get("metric") or {}).get("name", "top1") for s in summaries}
    if len(metrics_used) > 1:
        raise EdgedistillError(
            f"compare: these runs are judged on different metrics ({', '.join(sorted(metrics_used))}); "
            "set the same evaluate.metric for every run"
        )
    metric = metrics_used.pop()
    what = metric_title(summaries[0])

    def score(s: dict[str, Any], role: str) -> float:
        return s[role].get(metric, s[role]["top1"])

    header = (
        f"{'run':28} {'seed':>4} {'teacher':>8} {'student':>8} {'baseline':>8} {'retention':>9} {'KD gain':>8} {'p':>8}"
    )
    lines = [
        f"{what} of each model" + ("" if metric == "top1" else " (the runs' evaluate.metric)"),
        header,
        "-" * len(header),
    ]
    for name, s in zip(names, summaries):
        lines.append(
            f"{name[-28:]:28} {s.get('seed', '-')!s:>4} {100 * score(s, 'teacher'):7.2f}% "
            f"{100 * score(s, 'student'):7.2f}% {100 * score(s, 'baseline'):7.2f}% "
            f"{100 * s['retention']:8.1f}% {100 * s['kd_gain']:+7.2f} {s['significance']['p_value']:8.2g}"
        )

    def ms(values: list[float], fmt: str) -> str:
        if len(values) < 2:
            return format(values[0], fmt)
        return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt.lstrip('+'))}"

    retention = [100 * s["retention"] for s in summaries]
    gain = [100 * s["kd_gain"] for s in summaries]
    lines += [
        "",
        f"mean over {len(summaries)} run(s): retention {ms(retention, '.1f')}%, KD gain "
        f"{ms(gain, '+.2f')} points, student {ms([100 * score(s, 'student') for s in summaries], '.2f')}% "
        f"vs baseline {ms([100 * score(s, 'baseline') for s in summaries], '.2f')}% ({what})",
    ]
    if len(summaries) > 1 and statistics.mean(gain) > 0 and min(gain) <= 0:
        lines.append("the gain changes sign across runs: report it as not established")
    return "\n".join(lines)
