"""Benchmarks (not tests): each prints measured numbers; docs/benchmarks.md records them."""
