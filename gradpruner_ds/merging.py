"""The paper's merge of pruned layers into kept ones (method.md section 2), through the engine: each merged
layer sparsified by its own IGIA (a global top-p threshold per matrix, found by radix selection over ranks)
and added, sign-consistently, into the nearest kept layer below; or LaCo-style unmasked differences."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from gradpruner_ds.arch import ArchSpec
from gradpruner_ds.config import GradPrunerConfig
from gradpruner_ds.core.merge import keep_count, kth_largest, topk_mask
from gradpruner_ds.core.plan import PrunePlan
from gradpruner_ds.engine import EngineAdapter
from gradpruner_ds.statistics import IGIAStatistic


def merge_layers(
    plan: PrunePlan,
    igia: IGIAStatistic | None,
    spec: ArchSpec,
    config: GradPrunerConfig,
    backend: EngineAdapter,
) -> dict[str, Any]:
    """Merge ``plan``'s merged layers into their targets. Returns ``{"merge": [...]}``: per merged matrix the
    global fractions of entries selected by the top-p mask and merged."""
    if not plan.merged:
        return {"merge": []}
    assert igia is not None  # collected whenever num_merge > 0
    weights = igia.weights
    names = list(spec.linear_names)
    mkeys = [(p, n) for p in plan.merged for n in names]
    local = {k: igia.igia(k).reshape(-1) for k in mkeys}
    if config.merge_rule == "laco":  # unmasked: every entry of this rank's piece
        masks = {k: torch.ones_like(local[k], dtype=torch.bool) for k in mkeys}
    else:
        ks = [keep_count(backend.global_numel(weights[k]), config.keep_fraction) for k in mkeys]
        thresholds = kth_largest([local[k] for k in mkeys], ks, backend.all_reduce_sum_)
        masks = {k: topk_mask(local[k], thr) for k, thr in zip(mkeys, thresholds, strict=True)}
    del local
    by_target: dict[int, list[int]] = defaultdict(list)
    for p, t in plan.targets:
        by_target[t].append(p)
    groups = [
        ((t, n), [((p, n), masks[(p, n)]) for p in sources])
        for t, sources in sorted(by_target.items())
        for n in names
    ]
    # each target matrix is merged in one call, so every source's sign test sees the ORIGINAL target
    local_counts = backend.apply_merge(weights, groups, config.merge_rule, config.sign_consistent)
    counts = torch.tensor([list(local_counts.get(k, (0, 0))) for k in mkeys], dtype=torch.int64)
    backend.all_reduce_sum_(counts)
    stats = []
    for i, k in enumerate(mkeys):
        numel = backend.global_numel(weights[k])
        sel, added = counts[i].tolist()
        stats.append(
            {"layer": k[0], "sublayer": k[1], "mask_density": sel / numel, "merged_density": added / numel}
        )
    return {"merge": stats}
