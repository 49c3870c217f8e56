"""Consensus across ranks: every collective GradPruner issues itself (torch.distributed; gloo, NCCL or MPI
groups), each waited on at most ``consensus_timeout_s`` -- the sum of partial tables, the proof that every
rank runs the same settings and holds the same plan (and the same repair maps), the checkpoint barrier, and
the all-gather the ZeRO-3 backend assembles a weight with. A rank that never arrives (it crashed, or took
another code path) turns into a ``gradpruner:`` error on the waiting ranks instead of a hang."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from gradpruner_ds.core.plan import PrunePlan
from gradpruner_ds.errors import GradPrunerError


def _wait(work: Any, timeout_s: float | None, what: str) -> None:
    """Wait for an async collective, at most ``timeout_s`` (None: no limit)."""
    if timeout_s is None:
        work.wait()
        return
    try:
        finished = work.wait(timeout=timedelta(seconds=timeout_s))
    except RuntimeError as exc:
        raise GradPrunerError(
            f"gradpruner: not every rank reached {what} within consensus_timeout_s={timeout_s}s ({exc}). "
            "Fix: look for a rank that failed earlier in its log; raise consensus_timeout_s for very slow ranks"
        ) from exc
    if finished is False:
        raise GradPrunerError(
            f"gradpruner: not every rank reached {what} within consensus_timeout_s={timeout_s}s. "
            "Fix: look for a rank that failed earlier in its log"
        )


def all_reduce_sum_(
    t: torch.Tensor, group: dist.ProcessGroup | None = None, timeout_s: float | None = None, what: str = ""
) -> None:
    """In-place SUM over the group (float64 and int64 tensors included), bounded by ``timeout_s``."""
    work = dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group, async_op=True)
    _wait(work, timeout_s, what or "a GradPruner all-reduce")


GRADPRUNER_OFF: dict[str, Any] = {"gradpruner": "off"}
"""The settings a rank with GradPruner off brings to the settings check (so every rank learns of a mismatch)."""


def check_same_settings(
    settings: dict[str, Any], timeout_s: float, group: dist.ProcessGroup | None = None
) -> None:
    """Every rank runs GradPruner with the same settings: one MIN/MAX all-reduce of their digest, before any
    other collective of GradPruner; on a mismatch every rank raises an error naming the fields that differ."""
    blob = json.dumps(settings, sort_keys=True, default=str)
    words = digest_tensor(hashlib.sha256(blob.encode()).hexdigest())
    both = torch.cat([words, -words])
    _wait(
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group, async_op=True),
        timeout_s,
        "the settings check",
    )
    if torch.equal(both[:4], -both[4:]):
        return
    every = [json.loads(b) for b in all_gather_bytes(blob.encode(), timeout_s, group, "the settings check")]
    off = [r for r, one in enumerate(every) if one == GRADPRUNER_OFF]
    if off:
        on = [r for r in range(len(every)) if r not in off]
        raise GradPrunerError(
            f"gradpruner: GradPruner must be on on every rank or on none, but it is on on ranks {on} and off on ranks "
            f"{off} (got --gradpruner on some ranks only). Fix: launch every rank with the same flags and config"
        )
    fields = sorted({k for s in every for k in s if any(s.get(k) != o.get(k) for o in every)})
    values = {k: [s.get(k) for s in every] for k in fields}
    raise GradPrunerError(
        f"gradpruner: every rank must run GradPruner with the same settings, but these differ (value per rank): "
        f"{values}. Fix: give every rank the same gradpruner block and flags"
    )


def all_gather(
    t: torch.Tensor, timeout_s: float | None, group: dist.ProcessGroup | None = None, what: str = ""
) -> list[torch.Tensor]:
    """Every rank's ``t`` (same shape on every rank), in rank order, bounded by ``timeout_s``."""
    pieces = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    _wait(
        dist.all_gather(pieces, t, group=group, async_op=True), timeout_s, what or "a GradPruner all-gather"
    )
    return pieces


def all_gather_bytes(
    blob: bytes, timeout_s: float | None, group: dist.ProcessGroup | None = None, what: str = ""
) -> list[bytes]:
    """Every rank's ``blob`` (any length), in rank order: two bounded collectives (the longest length, then the
    padded bytes)."""
    n = torch.tensor([len(blob)], dtype=torch.int64)
    _wait(dist.all_reduce(n, op=dist.ReduceOp.MAX, group=group, async_op=True), timeout_s, what)
    buf = torch.zeros(int(n) + 8, dtype=torch.uint8)
    buf[:8] = torch.tensor(list(len(blob).to_bytes(8, "little")), dtype=torch.uint8)
    buf[8 : 8 + len(blob)] = torch.tensor(list(blob), dtype=torch.uint8)
    out = []
    for piece in all_gather(buf, timeout_s, group, what):
        size = int.from_bytes(bytes(piece[:8].tolist()), "little")
        out.append(bytes(piece[8 : 8 + size].tolist()))
    return out


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
    _wait(
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group, async_op=True), timeout_s, "the plan check"
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


def check_same_digest(
    digest: str, what: str, timeout_s: float | None, group: dist.ProcessGroup | None = None
) -> None:
    """Every rank computed the same ``digest`` of ``what`` (MIN and MAX of its words agree), or every rank
    raises; bounded by ``timeout_s``."""
    words = digest_tensor(digest)
    both = torch.cat([words, -words])
    _wait(
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group, async_op=True),
        timeout_s,
        f"the check of {what}",
    )
    if not torch.equal(both[:4], -both[4:]):
        raise GradPrunerError(
            f"gradpruner: the ranks computed different {what} (rank {dist.get_rank(group)} holds digest "
            f"{digest[:16]}...). Fix: every rank must run the same model, config and data-parallel setup; report "
            "this as a bug if they do"
        )


def wait_all(
    timeout_s: float, group: dist.ProcessGroup | None = None, what: str = "a GradPruner step"
) -> None:
    """A barrier bounded by ``timeout_s``: every rank has arrived, or this rank raises a ``gradpruner:``
    error naming ``what`` (a rank that died or hangs does not hold the others forever)."""
    _wait(dist.all_reduce(torch.zeros(1), group=group, async_op=True), timeout_s, what)
