"""Chaos harness: consumers and the local broker under crashes, restarts and cuts.

`python tests/chaos/run.py --seed N --duration S` runs it by hand; `test_chaos.py`
runs one short seed in the test suite. docs/chaos.md describes the faults and the
oracle.
"""
