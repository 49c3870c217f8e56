"""Dry run at cluster scale: what GradPruner costs on N ranks, computed from the real model structure.

The model is built on the meta device (no weights, any size), the real plan and surgery code run on it,
and the per-rank sizes follow ZeRO-3's partitioning rule (each parameter split into ``ceil(numel / W)``
entries per rank) or FSDP2's (rows of dim 0). Everything the prediction says about GradPruner's own
traffic and memory (IGIA state, collectives and their sizes) is exact arithmetic that the tests compare
with what real gloo ranks do; the time estimates use stated bandwidth assumptions and are only that.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from gradpruner_ds.arch import decoder_layers, get_arch, layer_linears
from gradpruner_ds.config import GradPrunerConfig
from gradpruner_ds.core.criteria import get_criterion
from gradpruner_ds.core.plan import make_plan
from gradpruner_ds.peft_support import linear_weight
from gradpruner_ds.statistics import required
from gradpruner_ds.surgery import remove_layers

LLAMA_3_1_70B = dict(
    model_type="llama",
    vocab_size=128256,
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    tie_word_embeddings=False,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
)
LLAMA_3_1_8B = dict(
    model_type="llama",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    tie_word_embeddings=False,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
)
KNOWN = {"llama-3.1-70b": LLAMA_3_1_70B, "llama-3.1-8b": LLAMA_3_1_8B}


@dataclass(frozen=True)
class Hardware:
    """Bandwidth assumptions for the time estimates (defaults: H100/H200-class node, 400 Gb/s IB)."""

    hbm_bytes_per_s: float = 2.5e12
    net_bytes_per_s: float = 4.0e10  # per rank, ring all-reduce bus bandwidth
    collective_latency_s: float = 3e-5


@dataclass
class DryRun:
    """Predicted per-rank costs of observing, planning, merging and re-partitioning."""

    model: str
    world_size: int
    mode: str
    window_steps: int
    num_layers: int
    removed: list[int]
    merged: list[int]
    params_before: int
    params_after: int
    igia_bytes_per_rank: int
    observe_collectives_per_step: int
    observe_bytes_per_step: int
    ranking_collectives: int
    ranking_bytes: int
    merge_collectives: int
    merge_bytes: int
    partition_numel_before: int
    partition_numel_after: int
    optimizer_state_bytes_before: int
    optimizer_state_bytes_after: int
    repair_runs: int = 0
    """Removed runs the ``repair`` block fits a map for (0 without it)."""
    repair_bytes_per_rank: int = 0
    """The repair sums on a rank (committed + one step's pending), with the configured map and dtype."""
    repair_options_bytes: dict[str, int] = field(default_factory=dict)
    """The same for every map / dtype choice (what keeps a large model affordable)."""
    repair_fold_bytes: int = 0
    """Bytes a rank receives to assemble the folded matrices (one MLP writer per run)."""
    time_s: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


def _partition(numel: int, world: int) -> int:
    return -(-numel // world)


def meta_model(model_config: dict[str, Any]) -> torch.nn.Module:
    """An HF CausalLM of the given config on the meta device (no memory, any size)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(model_config)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def dry_run(
    model_config: dict[str, Any],
    gp: GradPrunerConfig,
    *,
    world_size: int,
    total_steps: int | None = None,
    lora_rank: int = 8,
    mode: str = "full",
    scores: list[float] | None = None,
    hw: Hardware | None = None,
    name: str = "model",
) -> DryRun:
    """Predict GradPruner's costs for ``model_config`` on ``world_size`` ranks (ZeRO-3 / FSDP2 sharding).

    ``scores`` fixes the ranking (default: the paper's typical shape, importance falling with depth,
    which is what the raw IGIA sum gives); the plan, the surgery and the partition sizes are real.
    """
    hw = hw or Hardware()
    model = meta_model(model_config)
    spec = get_arch(model)
    layers = decoder_layers(model)
    n_layers = len(layers)
    window = gp.resolve_window(total_steps)
    n_drop, n_merge = gp.resolve_budget(n_layers)
    shapes = [
        {name: tuple(linear_weight(m).shape) for name, m in layer_linears(layer, spec).items()}
        for layer in layers
    ]
    n_mat = n_layers * len(spec.linear_names)
    # what the configured criterion collects: IGIA only for IGIA criteria or merge masks
    needs_igia = "igia" in required(get_criterion(gp.effective_criterion), n_merge)
    if not needs_igia:  # hidden-state sums (a few KiB) or nothing; each step: the finite check only
        igia, obs_colls, obs_bytes = 0, 1, 8
    elif mode == "full":
        igia = sum(_partition(math.prod(s), world_size) for layer in shapes for s in layer.values()) * 4
        obs_colls, obs_bytes = 1, 8  # the squared gradient norm (float64)
    else:  # per matrix the cheaper of: the factors of every step (whole), or an fp32 slice accumulator
        per_step = sum(lora_rank * (s[0] + s[1]) for layer in shapes for s in layer.values())
        igia = 4 * sum(
            min(window * lora_rank * (s[0] + s[1]), _partition(math.prod(s), world_size))
            for layer in shapes
            for s in layer.values()
        )
        obs_colls, obs_bytes = 2, 8 + per_step * 4
    sc = scores if scores is not None else [float(n_layers - i) for i in range(n_layers)]
    plan = make_plan(
        sc,
        n_drop,
        n_merge,
        criterion=gp.criterion,
        observed_steps=window,
        skipped_steps=0,
        step=window,
        config_digest=gp.config_digest(),
    )
    n_merged_mats = len(plan.merged) * len(spec.linear_names)
    ranking_bytes = (window + 2) * n_mat * 8 + 8 * 8  # score table + plan-digest check
    merge_colls = (4 + 1) if plan.merged else 0
    merge_bytes = (4 * n_merged_mats * 256 * 8 + n_merged_mats * 2 * 8) if plan.merged else 0
    params_before = sum(p.numel() for p in model.parameters())
    part_before = sum(_partition(p.numel(), world_size) for p in model.parameters())
    remove_layers(model, list(plan.removed))
    params_after = sum(p.numel() for p in model.parameters())
    part_after = sum(_partition(p.numel(), world_size) for p in model.parameters())
    igia_merged = igia / n_mat * n_merged_mats  # the merged matrices' share of the local IGIA pieces
    repair: dict[str, Any] = {}
    if gp.repair is not None:
        from gradpruner_ds.core.repair import removed_runs
        from gradpruner_ds.repair import statistics_bytes

        runs = [r for r in removed_runs(plan.removed) if r[0] >= 1]
        writer = shapes[0][spec.mlp_writer]
        dim = int(writer[0])  # the writer's rows: residual channels
        repair = {
            "repair_runs": len(runs),
            "repair_bytes_per_rank": statistics_bytes(dim, len(runs), gp.repair),
            "repair_options_bytes": {
                f"{m}/{dt}": statistics_bytes(
                    dim, len(runs), gp.repair.model_copy(update={"map": m, "dtype": dt})
                )
                for m in ("full", "diagonal")
                for dt in ("float64", "float32")
            },
            "repair_fold_bytes": len(runs) * (world_size - 1) * _partition(math.prod(writer), world_size) * 4,
        }
    t = {
        # full mode: read the gradient shard, read + write the fp32 accumulator
        "observe_per_step": (3 * igia / hw.hbm_bytes_per_s if mode == "full" else 0.0)
        + obs_colls * hw.collective_latency_s
        + obs_bytes / hw.net_bytes_per_s,
        "ranking": 2 * hw.collective_latency_s + 2 * ranking_bytes / hw.net_bytes_per_s,
        # 4 radix passes over the merged matrices' local IGIA + small histogram all-reduces
        "merge_thresholds": merge_colls * hw.collective_latency_s
        + 2 * merge_bytes / hw.net_bytes_per_s
        + 4 * igia_merged / hw.hbm_bytes_per_s,
        # ZeRO-3 re-partition at the same world size: local copies of the kept fp32 master + 2 moments
        "repartition_copies": 2 * 12 * part_after / hw.hbm_bytes_per_s,
    }
    return DryRun(
        model=name,
        world_size=world_size,
        mode=mode,
        window_steps=window,
        num_layers=n_layers,
        removed=list(plan.removed),
        merged=list(plan.merged),
        params_before=params_before,
        params_after=params_after,
        igia_bytes_per_rank=igia,
        observe_collectives_per_step=obs_colls,
        observe_bytes_per_step=obs_bytes,
        ranking_collectives=2,
        ranking_bytes=ranking_bytes,
        merge_collectives=merge_colls,
        merge_bytes=merge_bytes,
        partition_numel_before=part_before,
        partition_numel_after=part_after,
        optimizer_state_bytes_before=12 * part_before,
        optimizer_state_bytes_after=12 * part_after,
        time_s=t,
        **repair,
    )


def format_dry_run(d: DryRun) -> str:
    """A human-readable summary."""
    gib = 1024**3
    lines = [
        f"GradPruner dry run: {d.model}, {d.num_layers} layers, {d.params_before / 1e9:.2f} B params, "
        f"{d.world_size} ranks, {d.mode} mode, window {d.window_steps} steps",
        f"  plan: remove {len(d.removed)} layers {d.removed} (merged {d.merged}) -> "
        f"{d.params_after / 1e9:.2f} B params ({100 * d.params_after / d.params_before:.1f}%)",
        f"  IGIA state per rank: {d.igia_bytes_per_rank / gib:.3f} GiB (collected only for an IGIA criterion or a merge)",
        f"  observation: {d.observe_collectives_per_step} all-reduce(s) / step, {d.observe_bytes_per_step} B; "
        "no all-gather",
        f"  ranking: {d.ranking_collectives} all-reduces, {d.ranking_bytes / 1024:.1f} KiB",
        f"  merge thresholds: {d.merge_collectives} all-reduces, {d.merge_bytes / 1024:.1f} KiB",
        f"  partition per rank: {d.partition_numel_before / 1e6:.1f} M -> {d.partition_numel_after / 1e6:.1f} M params; "
        f"fp32 master + Adam: {d.optimizer_state_bytes_before / gib:.2f} -> {d.optimizer_state_bytes_after / gib:.2f} GiB",
        *(
            [
                f"  repair: {d.repair_runs} maps; sums per rank {d.repair_bytes_per_rank / gib:.3f} GiB ("
                + ", ".join(f"{k} {v / gib:.3f}" for k, v in d.repair_options_bytes.items())
                + f" GiB); fold gathers {d.repair_fold_bytes / gib:.3f} GiB"
            ]
            if d.repair_runs
            else []
        ),
        "  estimated time (assumed bandwidths): "
        + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in d.time_s.items()),
    ]
    return "\n".join(lines)
