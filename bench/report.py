"""Turn the figures of a benchmark run into tables and summary keys."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Table:
    """One printed table: a title, column names and rows of formatted cells."""

    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]

    def as_text(self) -> str:
        """Render the table with aligned columns for a terminal."""
        widths = [len(name) for name in self.columns]
        for row in self.rows:
            widths = [
                max(width, len(cell)) for width, cell in zip(widths, row, strict=True)
            ]
        lines = [self.title, _text_row(self.columns, widths)]
        lines.append("  ".join("-" * width for width in widths))
        lines += [_text_row(row, widths) for row in self.rows]
        return "\n".join(lines)

    def as_markdown(self) -> str:
        """Render the table as a Markdown table under a bold title."""
        lines = [f"**{self.title}**", ""]
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "---|" * len(self.columns))
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)


def _text_row(cells: tuple[str, ...], widths: list[int]) -> str:
    return "  ".join(
        cell.rjust(width) for cell, width in zip(cells, widths, strict=True)
    )


def _number(value: float, digits: int = 1) -> str:
    return f"{value:,.{digits}f}"


SUMMARY_KEYS = (
    "turnover_ratio",
    "throughput_ratio_1",
    "throughput_ratio_32",
    "scaling_32_over_1",
    "overhead_ratio",
    "rss_growth_mb",
)


def summary_keys(figures: dict[str, Any]) -> dict[str, float]:
    """Return the top-level ratios and numbers that the JSON output leads with."""
    throughput = figures["throughput"]
    levels = sorted(throughput, key=int)
    scaling = figures["scaling"]
    top = max(scaling, key=int)
    return {
        "turnover_ratio": figures["turnover"]["1_event"]["ratio"],
        "throughput_ratio_1": throughput[levels[0]]["ratio"],
        "throughput_ratio_32": throughput[levels[-1]]["ratio"],
        "scaling_32_over_1": scaling.get("32", scaling[top])["ours"]["over_lowest"],
        "overhead_ratio": figures["overhead"]["ratio"],
        "rss_growth_mb": figures["memory"]["growth_mb"],
    }


def throughput_table(figures: dict[str, Any]) -> Table:
    """Build the table of messages/s and CPU per 1,000 messages, ours and baseline."""
    rows = []
    for level, item in sorted(figures.items(), key=lambda pair: int(pair[0])):
        ours, baseline = item["ours"], item["baseline"]
        without = item["ours_without_checkpoint"]
        rows.append(
            (
                level,
                _number(ours["messages_per_s"]),
                _number(baseline["messages_per_s"]),
                _number(item["ratio"], 2),
                _number(ours["cpu_s_per_1000"], 2),
                _number(baseline["cpu_s_per_1000"], 2),
                _number(ours["broker_cpu_s_per_1000"], 2),
                _number(without["messages_per_s"]),
                _number(item["ratio_without_checkpoint"], 2),
            )
        )
    sample = next(iter(figures.values()))
    title = (
        f"Throughput: {sample['orders']} orders x {sample['events_per_order']} "
        "events, no-op handler"
    )
    columns = (
        "sessions",
        "ours msg/s",
        "baseline msg/s",
        "ratio",
        "ours CPU s/1k",
        "baseline CPU s/1k",
        "broker CPU s/1k (ours)",
        "ours msg/s, checkpoint off",
        "ratio, checkpoint off",
    )
    return Table(title, columns, tuple(rows))


def turnover_table(figures: dict[str, Any]) -> Table:
    """Build the table of orders per second, ours against the baseline."""
    rows = []
    for item in figures.values():
        rows.append(
            (
                f"{item['orders']} x {item['events_per_order']}",
                str(item["concurrency"]),
                _number(item["ours"]["orders_per_s"]),
                _number(item["baseline"]["orders_per_s"]),
                _number(item["ratio"], 2),
            )
        )
    columns = ("orders x events", "sessions", "ours orders/s", "baseline orders/s")
    return Table("Session turnover, no-op handler", (*columns, "ratio"), tuple(rows))


def breakdown_table(figures: dict[str, Any]) -> Table:
    """Build the table of seconds per session by phase, single-event turnover run."""
    item = figures["1_event"]
    phases = ("accept", "receive", "settle", "idle", "close", "broker_cpu")
    rows = []
    for kind in ("ours", "baseline"):
        breakdown = item[kind]["breakdown"]
        cells = [_number(breakdown[f"{phase}_s_per_session"], 3) for phase in phases]
        wall = item["concurrency"] / max(item[kind]["orders_per_s"], 1e-9)
        rows.append((kind, *cells, _number(wall, 3)))
    title = (
        f"Where a session's time goes, {item['orders']} single-event orders "
        "(seconds per session)"
    )
    columns = tuple(phases) + ("slot time per order",)
    return Table(title, ("consumer", *columns), tuple(rows))


def scaling_table(figures: dict[str, Any]) -> Table:
    """Build the table of messages per second with a 20 ms handler by concurrency."""
    rows = []
    for level, item in sorted(figures.items(), key=lambda pair: int(pair[0])):
        ours, baseline = item["ours"], item["baseline"]
        rows.append(
            (
                level,
                f"{item['orders']} x {item['events_per_order']}",
                _number(ours["messages_per_s"]),
                _number(ours["over_lowest"], 2),
                _number(baseline["messages_per_s"]),
                _number(baseline["over_lowest"], 2),
                _number(
                    ours["messages_per_s"] / max(baseline["messages_per_s"], 1e-9), 2
                ),
            )
        )
    columns = (
        "sessions",
        "orders x events",
        "ours msg/s",
        "ours vs 1",
        "baseline msg/s",
        "baseline vs 1",
        "ratio",
    )
    return Table("Concurrency scaling, handler awaits 20 ms", columns, tuple(rows))


def latency_table(figures: dict[str, Any]) -> Table:
    """Build the table of enqueue-to-completion latency at a steady publish rate."""
    rows = []
    for kind in ("ours", "baseline"):
        item = figures[kind]
        rows.append(
            (
                kind,
                _number(item["published_rate"]),
                _number(item["p50_ms"]),
                _number(item["p99_ms"]),
            )
        )
    title = (
        f"Latency at {figures['target_rate']:.0f} msg/s (half of our max), "
        f"{figures['orders']} orders"
    )
    columns = ("consumer", "published msg/s", "p50 ms", "p99 ms")
    return Table(title, columns, tuple(rows))


def overhead_table(figures: dict[str, Any]) -> Table:
    """Build the table of microseconds per message, in memory against the bare loop."""
    row = (
        str(figures["messages"]),
        _number(figures["ours_us_per_message"]),
        _number(figures["bare_us_per_message"]),
        _number(figures["ratio"], 2),
    )
    columns = ("messages", "ours us/msg", "bare loop us/msg", "ratio")
    return Table("Framework overhead floor, in memory", columns, (row,))


def memory_table(figures: dict[str, Any]) -> Table:
    """Build the table of the consumer process RSS at the two checkpoints."""
    first, last = figures["first_messages"], figures["last_messages"]
    rss = figures["rss_mb"]
    row = (
        str(figures["orders"]),
        _number(rss.get(str(first), 0.0)),
        _number(rss.get(str(last), 0.0)),
        _number(figures["growth_mb"]),
    )
    columns = (
        "orders",
        f"RSS MiB after {first:,}",
        f"RSS MiB after {last:,}",
        "growth MiB",
    )
    return Table("Memory of the consumer process", columns, (row,))


def all_tables(figures: dict[str, Any]) -> list[Table]:
    """Return every table of a complete run, in the order they are printed."""
    return [
        throughput_table(figures["throughput"]),
        turnover_table(figures["turnover"]),
        breakdown_table(figures["turnover"]),
        scaling_table(figures["scaling"]),
        latency_table(figures["latency"]),
        overhead_table(figures["overhead"]),
        memory_table(figures["memory"]),
    ]


def shutdown_problems(document: dict[str, Any]) -> list[str]:
    """List the runs whose consumer failed to stop cleanly after its last message."""
    problems: list[str] = []
    for measure in ("throughput", "turnover", "scaling", "latency"):
        for path, run in _runs(document[measure], measure):
            if run.get("stop_timed_out"):
                problems.append(f"{path}: did not stop within {run['stop_s']:.0f} s")
            if "stop_error" in run:
                problems.append(f"{path}: stopping raised {run['stop_error']}")
    return problems


def _runs(figures: dict[str, Any], prefix: str) -> list[tuple[str, dict[str, Any]]]:
    found: list[tuple[str, dict[str, Any]]] = []
    for name, value in figures.items():
        if not isinstance(value, dict):
            continue
        if "stop_s" in value:
            found.append((f"{prefix}.{name}", value))
        else:
            found += _runs(value, f"{prefix}.{name}")
    return found


def machine() -> dict[str, Any]:
    """Describe this machine: CPU count and model, RAM, Python and platform."""
    model = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    ram_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "ram_gib": round(ram_bytes / 1024**3, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
