"""Timing, memory and compile scripts; run them as modules from the repository root, e.g.
`python -m benchmarks.bench_attention`, so that they can import minidb's tests' reference helpers."""
