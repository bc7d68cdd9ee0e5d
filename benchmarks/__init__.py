"""The performance harness: ``python -m benchmarks.bench`` (see benchmarks/RESULTS.md)."""
