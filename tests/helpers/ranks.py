"""The N-rank runner the distributed tests share with the benchmarks (``benchmarks/ranks.py``)."""

from benchmarks.ranks import free_port, run_ranks

__all__ = ["free_port", "run_ranks"]
