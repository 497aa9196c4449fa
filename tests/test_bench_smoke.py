"""The benchmark machinery runs end to end at tiny sizes and reports every figure.

This checks that `bench/run.py` works, not how fast anything is: no assertion here
depends on a measured speed.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytest.importorskip("matplotlib", reason="the bench extra is not installed")
pytest.importorskip("psutil", reason="the bench extra is not installed")

from bench import report  # noqa: E402
from bench.docs import RESULTS_END, RESULTS_START, write_docs  # noqa: E402
from bench.measures.common import TINY  # noqa: E402
from bench.run import run_benchmark  # noqa: E402

MEASURES = ("throughput", "turnover", "scaling", "latency", "overhead", "memory")


def _check_summary_keys(document: dict[str, Any]) -> None:
    for key in report.SUMMARY_KEYS:
        assert key in document, f"missing summary key {key}"
        assert math.isfinite(document[key]), f"{key} is {document[key]!r}"


def _check_measures(document: dict[str, Any]) -> None:
    for measure in MEASURES:
        assert measure in document, f"missing measure {measure}"
    assert document["machine"]["nproc"] >= 1
    assert json.loads(json.dumps(document)) == document


def _check_every_message_completed(document: dict[str, Any]) -> None:
    for level in document["throughput"].values():
        expected = level["orders"] * level["events_per_order"]
        assert level["ours"]["messages"] == expected
        assert level["baseline"]["messages"] == expected
    single = document["turnover"]["1_event"]
    assert single["ours"]["breakdown"]["sessions"] >= single["orders"]
    assert single["baseline"]["breakdown"]["sessions"] >= single["orders"]


def _check_rss_samples(document: dict[str, Any]) -> None:
    memory = document["memory"]
    first, last = TINY.memory_checkpoints
    assert set(memory["rss_mb"]) == {str(first), str(last)}
    assert all(value > 0 for value in memory["rss_mb"].values())


def _check_docs(document: dict[str, Any], folder: Path) -> None:
    page = folder / "benchmarks.md"
    page.write_text(f"# Title\n\n{RESULTS_START}\nold\n{RESULTS_END}\n\nkept\n")
    write_docs(document, "python bench/run.py --tiny", folder)
    text = page.read_text()
    assert text.startswith("# Title")
    assert text.rstrip().endswith("kept")
    assert "old" not in text
    assert "turnover_ratio" in text
    assert (folder / "img" / "throughput_vs_concurrency.png").stat().st_size > 0
    assert (folder / "img" / "turnover_vs_baseline.png").stat().st_size > 0


# One test for the whole run, so that parallel test workers do not each start a
# benchmark of their own.
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tiny_run_reports_every_figure(tmp_path: Path) -> None:
    document = run_benchmark(TINY, log=lambda message: None)

    _check_summary_keys(document)
    _check_measures(document)
    _check_every_message_completed(document)
    _check_rss_samples(document)
    _check_docs(document, tmp_path)
