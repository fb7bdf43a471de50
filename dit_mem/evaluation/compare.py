"""Compare evaluation runs: one table (Markdown + CSV) and one grouped bar chart (PNG).

A run is a folder laid out by the ``dit-mem eval`` commands::

    RUN/vbench/videos/<folder>/*.mp4          vbench generate
    RUN/vbench/results/<folder>/*_eval_results.json   vbench score / vbench flicker
    RUN/phygenbench/PhyVideos/<model>/*.mp4   phygenbench generate
    RUN/phygenbench/scores.json               phygenbench score --run RUN

A folder without that layout is searched recursively for ``*_eval_results.json``. Metrics a
run does not have are shown as missing ("—" in Markdown, an empty CSV cell, "n/a" in the
chart), never as 0. VBench numbers are percentages, PhyGenBench numbers are in [0, 1].
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dit_mem.errors import UserError
from dit_mem.evaluation import benchmarks as B
from dit_mem.evaluation import vbench_scores as V
from dit_mem.evaluation.flicker import UNFILTERED_DIMENSION, UNFILTERED_LABEL
from dit_mem.utils import get_logger, write_text_atomic

logger = get_logger(__name__)

MISSING = "—"


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    group: str  # "vbench-summary", "vbench-dimension", "phygenbench"
    unit: str  # "%" or "0-1"


def _label(dim: str) -> str:
    return dim.replace("_", " ")


METRICS: tuple[Metric, ...] = (
    Metric("vbench.total", "VBench Total", "vbench-summary", "%"),
    Metric("vbench.quality", "VBench Quality", "vbench-summary", "%"),
    Metric("vbench.semantic", "VBench Semantic", "vbench-summary", "%"),
    Metric("vbench.quality_partial", "VBench Quality (partial)", "vbench-summary", "%"),
    Metric("vbench.semantic_partial", "VBench Semantic (partial)", "vbench-summary", "%"),
    *(Metric(f"vbench.{d}", _label(d), "vbench-dimension", "%") for d in V.ALL_DIMENSIONS),
    Metric(f"vbench.{UNFILTERED_DIMENSION}", UNFILTERED_LABEL, "vbench-dimension", "%"),
    *(
        Metric(
            f"phygenbench.{c}",
            f"PhyGenBench {c} ({B.PHYGENBENCH_CATEGORY_ALIAS[c]})",
            "phygenbench",
            "0-1",
        )
        for c in B.PHYGENBENCH_CATEGORIES
    ),
    Metric("phygenbench.overall", "PhyGenBench overall", "phygenbench", "0-1"),
)


@dataclass
class RunMetrics:
    label: str
    path: Path
    values: dict[str, float] = field(default_factory=dict)  # metric key -> value in its unit
    notes: list[str] = field(default_factory=list)


def _vbench_results_dir(run: Path) -> Path:
    standard = run / "vbench" / "results"
    return standard if standard.is_dir() else run


def load_run(path: str | Path, label: str | None = None) -> RunMetrics:
    """Collect every available metric of a run folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"run folder not found: {path}")
    run = RunMetrics(label or path.name, path)
    dims = {d: r.mean for d, r in V.collect_results(_vbench_results_dir(path)).items()}
    if dims:
        s = V.aggregate(dims)
        for d, v in s.dimensions.items():
            run.values[f"vbench.{d}"] = 100 * v
        for name in ("total", "quality", "semantic"):
            if getattr(s, name) is not None:
                run.values[f"vbench.{name}"] = 100 * getattr(s, name)
        for name in ("quality", "semantic"):
            if getattr(s, name) is None and getattr(s, f"{name}_partial") is not None:
                run.values[f"vbench.{name}_partial"] = 100 * getattr(s, f"{name}_partial")
        if missing := s.missing_dimensions:
            run.notes.append(f"VBench: missing {len(missing)} dimension(s): {', '.join(missing)}")
    phy = path / "phygenbench" / "scores.json"
    if phy.is_file():
        data = json.loads(phy.read_text(encoding="utf-8"))
        for c, v in (data.get("categories") or {}).items():
            if v is not None:
                run.values[f"phygenbench.{c}"] = float(v)
        if data.get("overall") is not None:
            run.values["phygenbench.overall"] = float(data["overall"])
        if not data.get("complete", True):
            run.notes.append("PhyGenBench: partial results (see phygenbench/scores.json)")
    if not run.values:
        run.notes.append("no results found")
    return run


def parse_run_arg(arg: str) -> tuple[str | None, str]:
    """``label=path`` or ``path``."""
    if "=" in arg and not Path(arg).exists():
        label, path = arg.split("=", 1)
        return label or None, path
    return None, arg


def _rows(runs: Sequence[RunMetrics]) -> list[Metric]:
    return [m for m in METRICS if any(m.key in r.values for r in runs)]


def _fmt(value: float | None) -> str:
    return MISSING if value is None else f"{value:.2f}"


def to_markdown(runs: Sequence[RunMetrics]) -> str:
    rows = _rows(runs)
    head = "| metric | unit | " + " | ".join(r.label for r in runs) + " |"
    sep = "|---|---|" + "---:|" * len(runs)
    body = [
        f"| {m.label} | {m.unit} | " + " | ".join(_fmt(r.values.get(m.key)) for r in runs) + " |"
        for m in rows
    ]
    notes = [f"- {r.label}: {n}" for r in runs for n in r.notes]
    text = "\n".join([head, sep, *body])
    if notes:
        text += "\n\n" + "\n".join(notes)
    text += (
        f"\n\n{MISSING} = not available (never 0). Partial group scores average only the "
        "dimensions present. Temporal flickering without the static filter is not VBench's "
        "official dimension and is not part of Quality.\n"
    )
    return text


def to_csv(runs: Sequence[RunMetrics]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["metric", "key", "unit", *(r.label for r in runs)])
    for m in _rows(runs):
        writer.writerow(
            [m.label, m.key, m.unit]
            + [("" if r.values.get(m.key) is None else f"{r.values[m.key]:.4f}") for r in runs]
        )
    return buf.getvalue()


def plot(runs: Sequence[RunMetrics], out: str | Path) -> Path:
    """Grouped bar chart, one panel per metric group present; missing bars marked 'n/a'."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from dit_mem.utils import atomic_path

    rows = _rows(runs)
    groups = [
        ("vbench-summary", "VBench summary (%)"),
        ("vbench-dimension", "VBench dimensions (%)"),
        ("phygenbench", "PhyGenBench (0-1)"),
    ]
    panels = [(g, t, [m for m in rows if m.group == g]) for g, t in groups]
    panels = [p for p in panels if p[2]]
    if not panels:
        raise UserError("no metric available in any run; nothing to plot")
    widths = [max(3.0, 0.45 * len(ms) * max(1, len(runs)) ** 0.5 + 1.5) for _, _, ms in panels]
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(max(widths) + 1, 4.2 * len(panels)), squeeze=False
    )
    colors = plt.get_cmap("tab10").colors
    bar_w = 0.8 / max(1, len(runs))
    for ax, (_, title, metrics) in zip(axes[:, 0], panels, strict=True):
        x = np.arange(len(metrics))
        present = [r.values[m.key] for m in metrics for r in runs if m.key in r.values]
        lo = min(present)
        hi = max(present)
        span = max(hi - lo, 1e-6)
        bottom = max(0.0, lo - 0.35 * span - (5 if metrics[0].unit == "%" else 0.05))
        top = hi + 0.15 * span + (1 if metrics[0].unit == "%" else 0.02)
        for j, run in enumerate(runs):
            offs = x - 0.4 + bar_w * (j + 0.5)
            for xi, m in zip(offs, metrics, strict=True):
                v = run.values.get(m.key)
                if v is None:
                    ax.text(
                        xi,
                        bottom + 0.03 * (top - bottom),
                        "n/a",
                        rotation=90,
                        ha="center",
                        va="bottom",
                        fontsize=8,
                        color="0.25",
                    )
                    continue
                ax.bar(xi, v - bottom, bar_w * 0.95, bottom=bottom, color=colors[j % 10])
                if len(metrics) <= 8:
                    ax.text(xi, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x)
        ax.set_xticklabels(
            [m.label.removeprefix("PhyGenBench ").removeprefix("VBench ") for m in metrics],
            rotation=30 if len(metrics) > 5 else 0,
            ha="right" if len(metrics) > 5 else "center",
            fontsize=8,
        )
        ax.set_ylim(bottom, top)
        ax.set_xlim(-0.6, len(metrics) - 0.4)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        handles = [plt.Rectangle((0, 0), 1, 1, color=colors[j % 10]) for j in range(len(runs))]
        ax.legend(
            handles,
            [r.label for r in runs],
            fontsize=8,
            loc="upper left",
            bbox_to_anchor=(1.0, 1.0),
        )
    fig.suptitle("Run comparison (n/a = not available; y axis does not start at 0)", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return out


def compare(runs: Sequence[RunMetrics], out_dir: str | Path | None = None) -> str:
    """Markdown table; with ``out_dir``, also writes compare.md, compare.csv and compare.png."""
    if not runs:
        raise UserError("compare needs at least one run")
    labels = [r.label for r in runs]
    if len(set(labels)) != len(labels):
        raise UserError(f"run labels must be unique, got {labels}; use label=path")
    md = to_markdown(runs)
    if out_dir is not None:
        out_dir = Path(out_dir)
        write_text_atomic(out_dir / "compare.md", md)
        write_text_atomic(out_dir / "compare.csv", to_csv(runs))
        if _rows(runs):
            plot(runs, out_dir / "compare.png")
    return md
