"""Benchmarks of the orders consumer against a hand-written baseline."""
