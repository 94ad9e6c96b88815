"""The loss chart (`loss --plot`): a PNG drawn from `history.loss_series` output.

matplotlib is imported when a chart is drawn, with the Agg backend, so no other command pays
for it. The series is the downsampled one (`queries.loss_curve`: at most a few thousand points,
the lowest and highest loss of each step range), which is all a chart of this width can show.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from lora_service.errors import ServiceError, UsageError
from lora_service.store import atomic_write_bytes

VERSIONS_MARKED = 12  # the newest versions of a long lineage get a band, a line and a name
VERSIONS_IN_LEGEND = 10  # beyond, the train loss is one line (coloured by version still)


def plot_loss(series: dict[str, Any], out: Path, *, width: int = 1200, height: int = 600) -> Path:
    """Write `series` as a PNG of `width`×`height` pixels, atomically.

    Train loss over global steps, one colour per version, a dotted line where each version
    ends (labelled with its name) and each version's validation loss as a diamond at its last
    step, so a rise after a new batch (forgetting) is visible at a glance. A lineage of more
    than `VERSIONS_MARKED` versions marks only its newest ones, and its legend names no
    version once they are more than `VERSIONS_IN_LEGEND`."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.transforms import blended_transform_factory

    out = Path(out)
    if not out.parent.is_dir():
        raise UsageError(f"{out.parent}: no such folder for --plot")
    points = list(series["points"])
    if not series["lineage"] and not points:
        raise ServiceError("nothing to plot: no version has been trained yet")
    dpi = 100
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    ax = fig.add_subplot()
    colours = matplotlib.colormaps["tab10"]
    versions = series["versions"]
    names = [v["version"] for v in versions]
    if any(p["version"] is None for p in points):
        names.append(None)
    by_version: dict[str | None, list[dict[str, Any]]] = {}
    for point in points:
        by_version.setdefault(point["version"], []).append(point)
    named = len(names) <= VERSIONS_IN_LEGEND
    marker = "o" if len(points) <= 300 else None
    for i, name in enumerate(names):
        pts = by_version.get(name)
        if pts:
            label = f"train loss {name or '(training now)'}" if named or name is None else (
                "train loss" if i == 0 else None)
            ax.plot([p["step"] for p in pts], [p["loss"] for p in pts], marker=marker,
                    markersize=3, linewidth=1.5 if named else 1.0, color=colours(i % 10),
                    label=label)
    val = [v for v in versions if v["val_loss"] is not None]
    if val:
        ax.plot([v["step"] for v in val], [v["val_loss"] for v in val], linestyle="--",
                marker="D" if len(val) <= 50 else None, markersize=7, color="black",
                label="validation loss (per version)")
    above = blended_transform_factory(ax.transData, ax.transAxes)
    first_marked = max(0, len(versions) - VERSIONS_MARKED)
    last_step = max([p["step"] for p in points[-1:]] + [v["step"] for v in versions[-1:]] + [1])
    gap = last_step * 80 / width  # steps between two names (about 80 pixels), newest kept
    labelled: list[int] = []
    for v in reversed(versions[first_marked:]):
        if not labelled or labelled[-1] - v["step"] >= gap:
            labelled.append(v["step"])
    for i, v in enumerate(versions[first_marked:], first_marked):
        # each version's steps as a shaded band, its name above the plot where it ends
        if i % 2 == 0:
            ax.axvspan(v["start_step"], v["step"], color="grey", alpha=0.08, linewidth=0)
        ax.axvline(v["step"], color="grey", linestyle=":", linewidth=1)
        if v["step"] in labelled:
            ax.text(v["step"], 1.01, v["version"] + (" (head)" if v["head"] else ""),
                    transform=above, ha="center", va="bottom", fontsize=9, color="dimgrey")
    target = series["version"]
    ax.set_title(f"Loss over the lineage of {target}" if target else "Loss", fontsize=13,
                 pad=20)
    sampled = series.get("downsampled")
    ax.set_xlabel("global step" + (
        f" (of {sampled['total_points']:,} logged points, the lowest and highest loss of each "
        f"{sampled['bucket_steps']:,} steps)" if sampled else ""), fontsize=11)
    ax.set_ylabel("loss (noise-prediction MSE)", fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.set_xlim(left=0)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=9, framealpha=0.9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    atomic_write_bytes(out, buffer.getvalue())
    return out
