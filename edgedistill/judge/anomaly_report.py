"""The anomaly detector's report, where people would rather look than read: the ROC of defective against good
parts, the score histograms of both with the threshold, and a grid of the worst-scored test images with their
anomaly-map overlays and, where they exist, the defect masks' outlines. Written as ``report.html`` (one
self-contained file) and ``report.md`` (the PNGs beside it, in ``report/``).
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Optional

import numpy as np

from edgedistill.files import atomic_write_bytes, atomic_write_text
from edgedistill.judge.metrics import roc_curve

GRID = 8  # the worst-scored images shown


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def figures(
    scores: np.ndarray,
    is_defective: np.ndarray,
    threshold: float,
    images: np.ndarray,
    maps: np.ndarray,
    masks: Optional[np.ndarray],
    kinds: list,
) -> dict[str, bytes]:
    """{title: PNG bytes}: ROC, score histograms, the worst-scored images with their maps."""
    import cv2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    bad = np.asarray(is_defective, dtype=bool)
    curve = roc_curve(bad, scores)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.plot(curve["false_reject"], curve["recall"], color="tab:red")
    ax.plot([0, 1], [0, 1], color="gray", linestyle=":")
    ax.set(xlabel="false-reject rate (good parts rejected)", ylabel="recall (defective parts rejected)")
    out["ROC: defective against good parts"] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(min(scores.min(), threshold), max(scores.max(), threshold), 40)
    ax.hist(scores[~bad], bins=bins, alpha=0.6, label=f"good ({(~bad).sum()})", color="tab:green")
    ax.hist(scores[bad], bins=bins, alpha=0.6, label=f"defective ({bad.sum()})", color="tab:red")
    ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3g}")
    ax.set(xlabel="image score (normalised: good parts' 0.995 map quantile = 0.1)", ylabel="images")
    ax.legend()
    out["score histograms and the threshold"] = _png(fig)
    plt.close(fig)

    worst = np.argsort(-scores)[:GRID]
    fig, axes = plt.subplots(2, len(worst), figsize=(1.8 * len(worst), 3.8), squeeze=False)
    top = float(np.quantile(maps, 0.999)) if maps.size else 1.0
    for col, i in enumerate(worst):
        axes[0][col].imshow(images[i])
        axes[0][col].set_title(f"{kinds[i]}\n{scores[i]:.3g}", fontsize=8)
        axes[1][col].imshow(images[i])
        axes[1][col].imshow(maps[i], cmap="jet", alpha=0.5, vmin=0, vmax=max(top, 1e-9))
        if masks is not None and masks[i].any():
            contours, _ = cv2.findContours(masks[i].astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            for c in contours:
                axes[1][col].plot(c[:, 0, 0], c[:, 0, 1], color="white", linewidth=1)
        for row in (0, 1):
            axes[row][col].axis("off")
    out[f"the {len(worst)} worst-scored images: map overlay, mask outline in white"] = _png(fig)
    plt.close(fig)
    return out


def write_report(
    run_dir: Path, lines: list[str], pngs: dict[str, bytes], title: str = "anomaly detector"
) -> tuple[Path, Path]:
    """``report.html`` (self-contained) and ``report.md`` with ``report/figure-N.png``."""
    folder = run_dir / "report"
    folder.mkdir(parents=True, exist_ok=True)
    md, body = list(lines) + [""], []
    for n, (title, png) in enumerate(pngs.items(), 1):
        atomic_write_bytes(folder / f"figure-{n}.png", png)
        md += [f"## {title}", "", f"![{title}](report/figure-{n}.png)", ""]
        data = base64.b64encode(png).decode()
        body.append(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>")
    text = "".join(f"<p>{html.escape(line.lstrip('#- '))}</p>" for line in lines if line.strip())
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>"
        + text
        + "".join(body)
        + "</body></html>"
    )
    atomic_write_text(run_dir / "report.md", "\n".join(md))
    atomic_write_text(run_dir / "report.html", page)
    return run_dir / "report.html", run_dir / "report.md"
