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
MISTRAL_7B = dict(  # Mistral-7B-v0.3
    model_type="mistral",
    vocab_size=32768,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=32768,
    tie_word_embeddings=False,
    rope_theta=1000000.0,
    rms_norm_eps=1e-5,
    sliding_window=None,
)
QWEN2_5_7B = dict(
    model_type="qwen2",
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=131072,
    tie_word_embeddings=False,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
)
QWEN3_8B = dict(
    model_type="qwen3",
    vocab_size=151936,
    hidden_size=4096,
    intermediate_size=12288,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    tie_word_embeddings=False,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
)
KNOWN = {
    "llama-3.1-70b": LLAMA_3_1_70B,
    "llama-3.1-8b": LLAMA_3_1_8B,
    "mistral-7b": MISTRAL_7B,
    "qwen2.5-7b": QWEN2_5_7B,
    "qwen3-8b": QWEN3_8B,
}
"""Model architectures by name: every model family of ``configs/`` (also under the spelling of its config
file, e.g. ``llama3.1-70b``). Weights are bf16 unless a config says otherwise (``torch_dtype`` / ``dtype``)."""
ALIASES = {"llama3.1-70b": "llama-3.1-70b", "llama3.1-8b": "llama-3.1-8b"}

_SIZES = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
)
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


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
    ranking: str = ""
    """Where the plan's ranking comes from: assumed (a dry run has no scores), given scores, or given layers."""
    weight_dtype: str = "bfloat16"
    """The training weights' dtype (the model config's ``torch_dtype`` / ``dtype``; bf16 when it has none)."""
    teacher_bytes_per_rank: int = 0
    """The ``recovery`` teacher on a rank: its ZeRO-3 / FSDP2 shard of a frozen copy of the pre-prune weights
    (0 without a ``recovery`` block)."""
    teacher_bytes_whole: int = 0
    """The same teacher whole, as one process and ZeRO-1/2 hold it."""
    teacher_steps: int = 0
    """Optimizer steps the teacher lives after the prune (``recovery.distill_steps``)."""
    time_s: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


def _partition(numel: int, world: int) -> int:
    return -(-numel // world)


def check_model_config(model_config: Any, where: str = "the model config") -> None:
    """A model config the dry run can build: an HF ``config.json`` dict whose sizes are positive integers and fit
    together (``gradpruner:`` errors naming the key, the value and the fix)."""
    from gradpruner_ds.errors import user_error

    if not isinstance(model_config, dict) or not isinstance(model_config.get("model_type"), str):
        raise user_error(
            f"{where} must be an HF config.json object with a model_type",
            type(model_config).__name__,
            "fix it",
        )
    from transformers import CONFIG_MAPPING

    if model_config["model_type"] not in CONFIG_MAPPING:
        raise user_error(
            f"{where}: model_type must be one transformers knows",
            model_config["model_type"],
            "use the config.json of a Llama, Mistral, Qwen2/3 or Gemma2/3 model",
        )
    for key in _SIZES:
        value = model_config.get(key)
        if value is None and key in (
            "head_dim",
            "num_key_value_heads",
            "intermediate_size",
            "max_position_embeddings",
        ):
            continue
        if value is None or isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise user_error(
                f"{where}: '{key}' must be a positive integer", value, f"set '{key}' as the model has it"
            )
    for key in ("rms_norm_eps", "rope_theta"):
        value = model_config.get(key)
        if value is not None and (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value <= 0
        ):
            raise user_error(
                f"{where}: '{key}' must be a positive number", value, f"set '{key}' as the model has it"
            )
    heads, kv = model_config["num_attention_heads"], model_config.get("num_key_value_heads") or 1
    if model_config.get("num_key_value_heads") and heads % kv:
        raise user_error(
            f"{where}: num_attention_heads must be a multiple of num_key_value_heads",
            (heads, kv),
            "fix the config",
        )
    if model_config.get("head_dim") is None and model_config["hidden_size"] % heads:
        raise user_error(
            f"{where}: hidden_size must be a multiple of num_attention_heads (or head_dim given)",
            (model_config["hidden_size"], heads),
            "fix the config",
        )
    dtype = _dtype_name(model_config)
    if dtype not in _DTYPE_BYTES:
        raise user_error(
            f"{where}: torch_dtype must be one of {sorted(_DTYPE_BYTES)}", dtype, "fix the config"
        )


def _dtype_name(model_config: dict[str, Any]) -> str:
    value = model_config.get("dtype") or model_config.get("torch_dtype") or "bfloat16"
    return str(value).removeprefix("torch.")


def meta_model(model_config: dict[str, Any]) -> torch.nn.Module:
    """An HF CausalLM of the given config on the meta device (no memory, any size); the config is checked first
    (:func:`check_model_config`), and a config transformers still cannot build is a ``gradpruner:`` error."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from gradpruner_ds.errors import user_error

    check_model_config(model_config)
    cfg = dict(model_config)
    try:
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # noqa: BLE001 - whatever transformers raises for a config it cannot build
        raise user_error(
            "the model config must describe a model transformers can build",
            f"{type(exc).__name__}: {exc}",
            "fix the config.json (or pass a known name)",
        ) from None


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

    ``scores`` fixes the ranking (default: an ASSUMPTION, importance falling with depth, which is what the raw
    IGIA sum gives; a dry run has no scores, so the layers a real run removes will differ; a plan given by
    ``layers_to_remove`` is exact); the plan, the surgery and the partition sizes are real. With a ``recovery``
    block the teacher's memory is counted: each rank's shard of a frozen copy of the weights (ZeRO-3 / FSDP2,
    what the dry run models) and the whole copy one process or ZeRO-1/2 hold.
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
    if gp.layers_to_remove is not None:
        sc = [0.0 if i in gp.layers_to_remove else 1.0 for i in range(n_layers)]
        ranking = "given: layers_to_remove (exact)"
    elif scores is not None:
        sc, ranking = list(scores), "given scores"
    else:
        sc = [float(n_layers - i) for i in range(n_layers)]
        ranking = (
            "an ASSUMED ranking, importance falling with depth (a dry run has no scores; the layers a real run removes "
            "follow its measured scores and will differ; the costs depend on how many layers, not which)"
        )
    plan = make_plan(
        sc,
        n_drop,
        n_merge,
        criterion=gp.effective_criterion,
        observed_steps=window,
        skipped_steps=0,
        step=window,
        config_digest=gp.config_digest(),
        protect=gp.protect_layers,
    )
    n_merged_mats = len(plan.merged) * len(spec.linear_names)
    ranking_bytes = (window + 2) * n_mat * 8 + 8 * 8  # score table + plan-digest check
    merge_colls = (4 + 1) if plan.merged else 0
    merge_bytes = (4 * n_merged_mats * 256 * 8 + n_merged_mats * 2 * 8) if plan.merged else 0
    params_before = sum(p.numel() for p in model.parameters())
    part_before = sum(_partition(p.numel(), world_size) for p in model.parameters())
    dtype = _dtype_name(model_config)
    teacher: dict[str, Any] = {"weight_dtype": dtype, "ranking": ranking}
    if gp.recovery is not None:  # a frozen copy of the pre-prune weights in their training dtype
        teacher.update(
            teacher_bytes_per_rank=part_before * _DTYPE_BYTES[dtype],
            teacher_bytes_whole=params_before * _DTYPE_BYTES[dtype],
            teacher_steps=gp.recovery.distill_steps,
        )
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
        **teacher,
    )


def format_dry_run(d: DryRun) -> str:
    """A human-readable summary."""
    gib = 1024**3
    lines = [
        f"GradPruner dry run: {d.model}, {d.num_layers} layers, {d.params_before / 1e9:.2f} B params, "
        f"{d.world_size} ranks, {d.mode} mode, window {d.window_steps} steps",
        f"  plan: remove {len(d.removed)} layers {d.removed} (merged {d.merged}) -> "
        f"{d.params_after / 1e9:.2f} B params ({100 * d.params_after / d.params_before:.1f}%)",
        f"  layers chosen by: {d.ranking or 'ASSUMED ranking: importance falling with depth'}",
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
        *(
            [
                f"  recovery teacher ({d.teacher_steps} steps after the prune, {d.weight_dtype} weights): "
                f"{d.teacher_bytes_per_rank / gib:.3f} GiB per rank (its ZeRO-3 / FSDP2 shard); a whole copy, "
                f"{d.teacher_bytes_whole / gib:.3f} GiB, in one process or under ZeRO-1/2"
            ]
            if d.teacher_steps
            else []
        ),
        "  estimated time (assumed bandwidths): "
        + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in d.time_s.items()),
    ]
    return "\n".join(lines)
