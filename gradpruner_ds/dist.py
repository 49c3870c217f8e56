"""Collectives that compose core results across ranks (torch.distributed; gloo, NCCL or MPI groups)."""

from __future__ import annotations

import hashlib
from datetime import timedelta

import torch
import torch.distributed as dist

from gradpruner_ds.core.plan import PrunePlan
from gradpruner_ds.errors import GradPrunerError


def all_reduce_sum_(t: torch.Tensor, group: dist.ProcessGroup | None = None) -> None:
    """In-place SUM over the group (float64 and int64 tensors included)."""
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)


def digest_tensor(hex_digest: str) -> torch.Tensor:
    """A sha256 hex digest as 4 int64 words (collective-friendly)."""
    raw = bytes.fromhex(hex_digest)
    return torch.tensor(
        [int.from_bytes(raw[i : i + 8], "little", signed=True) for i in range(0, 32, 8)], dtype=torch.int64
    )


def check_same_plan(plan: PrunePlan, timeout_s: float, group: dist.ProcessGroup | None = None) -> None:
    """Every rank proves it holds the same plan: MIN and MAX of the digest words must agree.

    The collective is waited on with a timeout, so a rank that never arrives (it crashed, or took
    another code path) turns into an error on the waiting ranks instead of a hang.
    """
    words = digest_tensor(plan.digest())
    both = torch.cat([words, -words])  # MAX of -x is -MIN of x: one collective gives min and max
    work = dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group, async_op=True)
    try:
        finished = work.wait(timeout=timedelta(seconds=timeout_s))
    except RuntimeError as exc:
        raise GradPrunerError(
            f"gradpruner: the ranks did not all reach the plan check within consensus_timeout_s={timeout_s}s "
            f"({exc}). Fix: look for a rank that failed earlier in its log; raise consensus_timeout_s for very "
            "slow ranks"
        ) from exc
    if finished is False:
        raise GradPrunerError(
            f"gradpruner: the ranks did not all reach the plan check within consensus_timeout_s={timeout_s}s. "
            "Fix: look for a rank that failed earlier in its log"
        )
    max_words, neg_min_words = both[:4], both[4:]
    if not torch.equal(max_words, -neg_min_words):
        rank = dist.get_rank(group)
        raise GradPrunerError(
            f"gradpruner: the ranks computed different prune plans (rank {rank} holds digest "
            f"{plan.digest()[:16]}..., scores {hashlib.sha256(repr(plan.scores).encode()).hexdigest()[:8]}). "
            "Fix: every rank must run the same model, config and data-parallel setup; report this as a bug "
            "if they do"
        )
