"""The text summary of a chaos run."""

from __future__ import annotations

from tests.chaos.harness import ChaosReport
from tests.chaos.oracle import OBSERVED_KINDS

MAX_LISTED_VIOLATIONS = 20


def render(report: ChaosReport) -> str:
    """Return the summary: counts, dead letters, faults by kind and violations."""
    counts = report.verdict.counts
    injected = {
        kind: count
        for kind, count in report.faults_by_kind.items()
        if kind not in OBSERVED_KINDS
    }
    observed = {
        kind: count
        for kind, count in report.faults_by_kind.items()
        if kind in OBSERVED_KINDS
    }
    lines = [
        f"seed {report.seed}, checkpoint {'on' if report.checkpoint else 'off'}, "
        f"broker with --data-dir: {'yes' if report.broker_durable else 'no'}, "
        f"{report.elapsed_s:.0f}s",
        f"messages published: {counts.get('published', 0)} "
        f"(unsent: {report.unsent}, in chunks sent again: {report.resent})",
        f"messages handled: {counts.get('handled', 0)} "
        f"(journal lines: {counts.get('journal_lines', 0)})",
        f"duplicate handlings: {counts.get('duplicates', 0)}"
        + _details(counts, "duplicates_after_"),
        f"dead-lettered: {counts.get('dead_lettered', 0)}"
        + _listing(report.verdict.dead_lettered_by_reason),
        f"deferred in parked orders: {counts.get('parked_messages', 0)}",
        f"faults injected: {sum(injected.values())}" + _listing(injected),
        f"faults observed, not injected: {sum(observed.values())}" + _listing(observed),
        f"violations: {len(report.verdict.violations)}",
    ]
    shown = report.verdict.violations[:MAX_LISTED_VIOLATIONS]
    lines.extend(f"  - {violation}" for violation in shown)
    hidden = len(report.verdict.violations) - len(shown)
    if hidden:
        lines.append(f"  ... and {hidden} more")
    lines.extend(f"note: {note}" for note in report.notes)
    return "\n".join(lines)


def _listing(counts: dict[str, int]) -> str:
    if not counts:
        return ""
    parts = [f"{name} {count}" for name, count in sorted(counts.items())]
    return " (" + ", ".join(parts) + ")"


def _details(counts: dict[str, int], prefix: str) -> str:
    return _listing(
        {
            name.removeprefix(prefix): count
            for name, count in counts.items()
            if name.startswith(prefix)
        }
    )
