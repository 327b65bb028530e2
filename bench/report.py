"""Results, verdicts, and the Markdown report with its plots."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

TargetKind = Literal["ratio_ge", "ratio_le", "diff_le", "max_le"]


@dataclass(frozen=True)
class Target:
    """What a row must meet: ``ratio_*`` compares the median of the per-run ratios
    value/floor; ``diff_le`` the median value minus the median floor; ``max_le`` the
    worst run alone."""

    kind: TargetKind
    bound: float
    text: str

    def met(self, row: Row) -> bool | None:
        if self.kind == "max_le":
            return max(row.values) <= self.bound if row.values else None
        if not row.floor or not row.values:
            return None
        if self.kind == "diff_le":
            return statistics.median(row.values) - statistics.median(row.floor) <= self.bound
        ratio = row.ratio()
        if ratio is None:
            return None
        return ratio >= self.bound if self.kind == "ratio_ge" else ratio <= self.bound


@dataclass
class Row:
    label: str
    unit: str
    values: list[float] = field(default_factory=list)  # one per run
    floor: list[float] = field(default_factory=list)  # the floor, measured in the same run
    target: Target | None = None
    digits: int = 1

    def ratio(self) -> float | None:
        """Median of the per-run ratios value/floor."""
        pairs = [(v, f) for v, f in zip(self.values, self.floor, strict=False) if f]
        if not pairs:
            return None
        return statistics.median(v / f for v, f in pairs)


@dataclass
class Scenario:
    key: str
    title: str
    setup: str
    rows: list[Row] = field(default_factory=list)
    per_run_columns: list[str] = field(default_factory=list)
    per_run: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    error: str | None = None

    def row(self, label: str, unit: str, **kwargs: object) -> Row:
        for row in self.rows:
            if row.label == label:
                return row
        new = Row(label, unit, **kwargs)  # type: ignore[arg-type]
        self.rows.append(new)
        return new


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _verdict(row: Row) -> str:
    if row.target is None:
        return ""
    met = row.target.met(row)
    if met is None:
        return "not measured"
    return "**met**" if met else "**missed**"


def scenario_markdown(scenario: Scenario) -> str:
    lines = [f"## {scenario.title}", "", scenario.setup, ""]
    if scenario.error:
        lines += [f"**This scenario did not complete:** `{scenario.error}`", ""]
    if scenario.rows:
        lines += [
            "| measure | min | median | max | floor (median) | ratio | target | |",
            "|---|---:|---:|---:|---:|---:|---|---|",
        ]
        for row in scenario.rows:
            values = row.values or [float("nan")]
            has_values = bool(row.values)
            floor = statistics.median(row.floor) if row.floor else None
            ratio = row.ratio()
            if row.target and row.target.kind == "diff_le" and has_values and floor is not None:
                compared = f"+{statistics.median(row.values) - floor:.1f} {row.unit}"
            else:
                compared = f"{ratio:.2f}x" if ratio is not None else ""
            cells = [
                f"{row.label} ({row.unit})",
                _fmt(min(values) if has_values else None, row.digits),
                _fmt(statistics.median(values) if has_values else None, row.digits),
                _fmt(max(values) if has_values else None, row.digits),
                _fmt(floor, row.digits),
                compared,
                row.target.text if row.target else "",
                _verdict(row),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if scenario.per_run:
        lines += [
            "| " + " | ".join(scenario.per_run_columns) + " |",
            "|" + "---|" * len(scenario.per_run_columns),
        ]
        lines += ["| " + " | ".join(cells) + " |" for cells in scenario.per_run]
        lines.append("")
    for plot in scenario.plots:
        lines += [f"![{scenario.title}]({plot})", ""]
    for note in scenario.notes:
        lines += [f"- {note}"]
    if scenario.notes:
        lines.append("")
    return "\n".join(lines)


def summary_markdown(scenarios: Sequence[Scenario]) -> str:
    lines = [
        "| scenario | measure | result | target | |",
        "|---|---|---:|---|---|",
    ]
    for scenario in scenarios:
        for row in scenario.rows:
            if row.target is None:
                continue
            if row.target.kind == "max_le":
                result = f"{_fmt(max(row.values) if row.values else None, row.digits)} {row.unit}"
            elif row.target.kind == "diff_le":
                if row.values and row.floor:
                    diff = statistics.median(row.values) - statistics.median(row.floor)
                    result = f"floor +{diff:.1f} {row.unit}"
                else:
                    result = "-"
            else:
                ratio = row.ratio()
                result = f"{ratio:.2f}x" if ratio is not None else "-"
            lines.append(
                f"| {scenario.title} | {row.label} | {result} | {row.target.text} | "
                f"{_verdict(row)} |"
            )
    return "\n".join(lines)


# -- plots -------------------------------------------------------------------------------


def _pyplot() -> object:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_latency_cdf(
    path: Path, title: str, series: Mapping[str, Sequence[float]], *, xlabel: str = "latency (ms)"
) -> None:
    """Cumulative distribution of latencies, one line per series, log x axis. Series
    ending in the same ", N clients" share a colour; a floor is dashed (dash-dot on a
    backlog), a busy run dotted."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))  # type: ignore[attr-defined]
    groups: dict[str, str] = {}
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    for label, values in series.items():
        if not values:
            continue
        ordered = sorted(values)
        n = len(ordered)
        group = label.rpartition(", ")[2] if ", " in label else label
        color = groups.setdefault(group, palette[len(groups) % len(palette)])
        if "backlog" in label:
            style = "-."
        elif "floor" in label:
            style = "--"
        else:
            style = ":" if "busy" in label else "-"
        ax.plot(
            ordered,
            [(i + 1) / n for i in range(n)],
            style,
            color=color,
            label=f"{label} (n={n})",
        )
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of requests ≤ x")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)  # type: ignore[attr-defined]


def plot_scale_out(
    path: Path, procs: Sequence[int], measured: Sequence[float], linear: Sequence[float]
) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))  # type: ignore[attr-defined]
    ax.plot(procs, linear, "--", color="grey", label="linear ideal (from 1 process)")
    ax.plot(procs, [0.9 * value for value in linear], ":", color="grey", label="0.9 x linear")
    ax.plot(procs, measured, "o-", label="buildq (median)")
    ax.set_xticks(list(procs))
    ax.set_xlabel("worker processes (5 slots each)")
    ax.set_ylabel("projects / s")
    ax.set_title("Scale-out: throughput vs worker processes")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)  # type: ignore[attr-defined]


def plot_bars(
    path: Path, title: str, ylabel: str, bars: dict[str, float], limits: dict[str, float]
) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))  # type: ignore[attr-defined]
    names = list(bars)
    ax.bar(names, [bars[name] for name in names], color="tab:blue")
    for i, name in enumerate(names):
        if name in limits:
            ax.hlines(limits[name], i - 0.4, i + 0.4, colors="tab:red", linestyles="--")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)  # type: ignore[attr-defined]
