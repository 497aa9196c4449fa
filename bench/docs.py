"""Write benchmark results into docs/benchmarks.md and draw the plots in docs/img/.

Only the part between `RESULTS_START` and `RESULTS_END` is replaced, so the analysis
written by hand around it survives a new run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import report

RESULTS_START = "<!-- results:start (written by bench/run.py --docs) -->"
RESULTS_END = "<!-- results:end -->"
SCALING_PLOT = "img/throughput_vs_concurrency.png"
TURNOVER_PLOT = "img/turnover_vs_baseline.png"


def results_markdown(document: dict[str, Any], command: str) -> str:
    """Render the machine, the command, the summary and every table as Markdown."""
    machine = document["machine"]
    lines = [
        RESULTS_START,
        "",
        f"Machine: {machine['nproc']} CPUs ({machine['cpu_model']}), "
        f"{machine['ram_gib']} GiB RAM, Python {machine['python']}, "
        f"{machine['platform']}.",
        "",
        f"Command: `{command}` (took {document['duration_s']:.0f} s). Broker: "
        f"{document['broker']}. Session idle timeout (ours) and `max_wait_time` "
        f"(baseline): {document['idle_timeout_s']} s.",
        "",
        "| summary key | value |",
        "|---|---|",
    ]
    lines += [f"| `{key}` | {document[key]:.2f} |" for key in report.SUMMARY_KEYS]
    for table in report.all_tables(document):
        lines += ["", table.as_markdown()]
    problems = report.shutdown_problems(document)
    if problems:
        lines += [
            "",
            "Consumers that did not stop cleanly after their last message:",
            "",
        ]
        lines += [f"- {problem}" for problem in problems]
    lines += [
        "",
        f"![throughput vs concurrency]({SCALING_PLOT})",
        "",
        f"![turnover vs baseline]({TURNOVER_PLOT})",
        "",
        RESULTS_END,
    ]
    return "\n".join(lines)


def write_docs(document: dict[str, Any], command: str, docs_dir: Path) -> Path:
    """Replace the results section of `docs_dir/benchmarks.md` and redraw the plots.

    A missing page, or one without the markers, gets the section appended.
    """
    (docs_dir / "img").mkdir(parents=True, exist_ok=True)
    plot_scaling(document["scaling"], docs_dir / SCALING_PLOT)
    plot_turnover(document["turnover"], docs_dir / TURNOVER_PLOT)
    page = docs_dir / "benchmarks.md"
    text = page.read_text(encoding="utf-8") if page.is_file() else ""
    section = results_markdown(document, command)
    if RESULTS_START in text and RESULTS_END in text:
        before = text.split(RESULTS_START, 1)[0]
        after = text.split(RESULTS_END, 1)[1]
        text = before + section + after
    else:
        text = text + "\n" + section + "\n"
    page.write_text(text, encoding="utf-8")
    return page


def plot_scaling(figures: dict[str, Any], path: Path) -> None:
    """Draw messages per second against concurrency for ours and the baseline."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    levels = sorted(figures, key=int)
    figure, axes = pyplot.subplots(figsize=(6, 4))
    for kind, marker in (("ours", "o"), ("baseline", "s")):
        values = [figures[level][kind]["messages_per_s"] for level in levels]
        axes.plot([int(level) for level in levels], values, marker=marker, label=kind)
    axes.set_xscale("log", base=2)
    axes.set_xticks([int(level) for level in levels], levels)
    axes.set_xlabel("max concurrent sessions")
    axes.set_ylabel("messages/s (handler awaits 20 ms)")
    axes.set_title("Throughput vs concurrency")
    axes.legend()
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def plot_turnover(figures: dict[str, Any], path: Path) -> None:
    """Draw orders per second, ours beside the baseline, for each turnover workload."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    names = list(figures)
    positions = range(len(names))
    width = 0.38
    figure, axes = pyplot.subplots(figsize=(6, 4))
    ours = [figures[name]["ours"]["orders_per_s"] for name in names]
    baseline = [figures[name]["baseline"]["orders_per_s"] for name in names]
    axes.bar([p - width / 2 for p in positions], ours, width, label="ours")
    axes.bar([p + width / 2 for p in positions], baseline, width, label="baseline")
    axes.set_xticks(list(positions))
    axes.set_xticklabels([name.replace("_", "-") + " orders" for name in names])
    axes.set_ylabel("orders/s")
    axes.set_title("Session turnover vs baseline")
    axes.legend()
    axes.grid(True, axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
