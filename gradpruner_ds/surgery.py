"""Layer surgery: remove decoder layers from an HF CausalLM in place and repair every layer-indexed invariant.

Repaired after removal: the decoder ``nn.ModuleList``, every ``layer_idx`` attribute inside the kept layers
(the KV-cache slot), ``config.num_hidden_layers``, each per-layer config list (``layer_types``...), Qwen's
``max_window_layers`` / ``has_sliding_layers``, tied input/output embeddings, and layer-indexed fields of
peft adapter configs (``layers_to_transform``, explicit ``layers.<i>.`` names in patterns).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from gradpruner_ds.arch import ArchSpec, decoder_layers, get_arch, unwrap_model, wrapper_chain
from gradpruner_ds.core.plan import PrunePlan
from gradpruner_ds.errors import user_error
from gradpruner_ds.log import get_logger
from gradpruner_ds.peft_support import peft_configs as peft_configs_of
from gradpruner_ds.peft_support import remap_peft_config

_log = get_logger("surgery")

# Config list attributes that are never per-layer even when their length happens to equal the layer count.
_NOT_PER_LAYER = frozenset({"architectures", "eos_token_id", "bos_token_id", "pad_token_id", "bad_words_ids"})
# Per-layer list names HF uses across families; re-indexed whenever a config carries them.
_KNOWN_PER_LAYER = ("layer_types", "mlp_layer_types")


def _validate_drop(drop: Sequence[int], n_layers: int) -> set[int]:
    if isinstance(drop, str | bytes | Mapping) or not isinstance(drop, Iterable):
        raise user_error("drop must be a sequence of layer indices", drop, "pass e.g. [3, 7]")
    indices: list[int] = []
    for item in list(drop):
        try:
            if isinstance(item, bool):
                raise TypeError
            indices.append(operator.index(item))
        except TypeError:
            raise user_error("drop must contain integer layer indices", item, "pass e.g. [3, 7]") from None
    bad = sorted({i for i in indices if not 0 <= i < n_layers})
    if bad:
        raise user_error(
            f"layer indices to drop must be in [0, {n_layers})",
            bad,
            f"use original decoder-layer indices between 0 and {n_layers - 1}",
        )
    dupes = sorted({i for i in indices if indices.count(i) > 1})
    if dupes:
        raise user_error("layer indices to drop contain duplicates", dupes, "list each layer once")
    if len(indices) >= n_layers:
        raise user_error(
            f"cannot drop all {n_layers} decoder layers",
            sorted(indices),
            "keep at least one layer (lower the prune ratio)",
        )
    return set(indices)


def _per_layer_list_names(config: Any, spec: ArchSpec, n_layers: int) -> list[str]:
    """Names of the config's per-layer lists; raises when one has the wrong length."""
    names: list[str] = []
    for name in dict.fromkeys((*spec.per_layer_config_lists, *_KNOWN_PER_LAYER)):
        value = getattr(config, name, None)
        if value is None:
            continue
        if not isinstance(value, list | tuple) or len(value) != n_layers:
            raise user_error(
                f"config.{name} must hold one entry per decoder layer ({n_layers})",
                value,
                f"fix config.{name} (or config.num_hidden_layers) so that they agree",
            )
        names.append(name)
    for key, value in vars(config).items():
        if (
            isinstance(value, list | tuple)
            and len(value) == n_layers
            and key not in names
            and key not in _NOT_PER_LAYER
            and not key.startswith("_")
        ):
            _log.warning(
                "config.%s has one entry per layer but is not a known per-layer list; left unchanged "
                "(add it to ArchSpec.per_layer_config_lists if it is indexed by layer)",
                key,
            )
    return names


def _check_layer_types(layers: nn.ModuleList, layer_types: Sequence[Any] | None) -> None:
    """Each module that cached a ``layer_type`` at init must agree with ``config.layer_types``."""
    if layer_types is None:
        return
    for i, layer in enumerate(layers):
        for sub in layer.modules():
            cached = getattr(sub, "layer_type", None)
            if isinstance(cached, str) and cached != layer_types[i]:
                raise user_error(
                    f"decoder layer {i} was built as {cached!r} but config.layer_types[{i}] differs",
                    layer_types[i],
                    "do not edit config.layer_types after building the model",
                )


def _layer_name_regex(spec: ArchSpec) -> re.Pattern[str]:
    attr = re.escape(spec.layers_path.rsplit(".", 1)[-1])
    # "layers.3." / "layers.3" at the end, also with a regex-escaped dot ("layers\.3\.").
    return re.compile(rf"(?<![A-Za-z0-9_]){attr}(\\?\.)(\d+)(?=\\?\.|$)")


def _renumber_layer_idx(layers: nn.ModuleList) -> None:
    for new_idx, layer in enumerate(layers):
        for sub in layer.modules():
            idx = getattr(sub, "layer_idx", None)
            if isinstance(idx, int) and not isinstance(idx, bool):
                setattr(sub, "layer_idx", new_idx)  # noqa: B010 - mypy sees Module attributes as Tensor|Module


def _tie_state(hf_model: Any) -> tuple[nn.Module | None, nn.Module | None]:
    try:
        return hf_model.get_input_embeddings(), hf_model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None, None


def remove_layers(model: Any, drop: Sequence[int]) -> list[int]:
    """Remove the decoder layers whose original indices are in ``drop`` (in place); return the kept indices.

    Works on an HF CausalLM model or a wrapped one (peft, DeepSpeed engine, DDP/FSDP). Input is validated
    before anything changes: indices must be in range, unique and must leave at least one layer.
    """
    hf_model = unwrap_model(model)
    spec = get_arch(hf_model.config)
    layers = decoder_layers(hf_model)
    n_layers = len(layers)
    config = hf_model.config.get_text_config(decoder=True)

    # ---- validate everything before touching the model ----
    drop_set = _validate_drop(drop, n_layers)
    if getattr(config, "num_hidden_layers", n_layers) != n_layers:
        raise user_error(
            f"config.num_hidden_layers disagrees with the {n_layers} decoder layers in the model",
            config.num_hidden_layers,
            "load the model unmodified (or fix config.num_hidden_layers) before pruning",
        )
    if getattr(config, "is_heterogeneous", False):
        raise user_error(
            "heterogeneous configs (per_layer_config) are not supported by layer removal",
            type(config).__name__,
            "prune a homogeneous model",
        )
    list_names = _per_layer_list_names(config, spec, n_layers)
    _check_layer_types(layers, getattr(config, "layer_types", None))
    peft_configs = peft_configs_of(wrapper_chain(model))
    for cfg in peft_configs:
        if getattr(cfg, "layer_replication", None):
            raise user_error(
                "peft layer_replication cannot be combined with layer removal",
                cfg.layer_replication,
                "prune the base model before adding a LoRA adapter that uses layer_replication",
            )

    kept = [i for i in range(n_layers) if i not in drop_set]
    if not drop_set:
        return kept
    new_index = {orig: new for new, orig in enumerate(kept)}
    embed_in, embed_out = _tie_state(hf_model)
    tie = bool(getattr(hf_model.config, "tie_word_embeddings", False)) or bool(
        getattr(config, "tie_word_embeddings", False)
    )

    # ---- decoder ModuleList and per-module layer_idx ----
    parent_path, _, attr = spec.layers_path.rpartition(".")
    parent = hf_model.get_submodule(parent_path) if parent_path else hf_model
    new_layers = nn.ModuleList([layers[i] for i in kept])
    setattr(parent, attr, new_layers)
    _renumber_layer_idx(new_layers)

    # ---- config ----
    config.num_hidden_layers = len(kept)
    for name in list_names:
        old = getattr(config, name)
        setattr(config, name, type(old)(old[i] for i in kept))
    mwl = getattr(config, "max_window_layers", None)
    if isinstance(mwl, int) and not isinstance(mwl, bool):
        # Qwen: layer i slides iff i >= max_window_layers; the kept layers below the bound stay below it.
        config.max_window_layers = sum(1 for i in kept if i < mwl)
    if hasattr(parent, "has_sliding_layers") and getattr(config, "layer_types", None) is not None:
        setattr(parent, "has_sliding_layers", "sliding_attention" in config.layer_types)  # noqa: B010

    # ---- tied embeddings (untouched by removal; re-tie defensively) ----
    if tie and embed_in is not None and embed_out is not None and embed_out.weight is not embed_in.weight:
        embed_out.weight = embed_in.weight

    # ---- peft adapter configs ----
    regex = _layer_name_regex(spec)
    for cfg in peft_configs:
        remap_peft_config(cfg, regex, new_index)

    _log.info(
        "removed %d of %d decoder layers %s; kept original layers %s",
        len(drop_set),
        n_layers,
        sorted(drop_set),
        kept,
    )
    return kept


def apply_surgery(
    model: Any, plan: PrunePlan, whole: PrunePlan | None = None, prior: Mapping[str, Any] | None = None
) -> list[nn.Parameter]:
    """Remove the plan's layers (positions in the model as it is now) from ``model`` and record the prune in its
    config (``config.gradpruner``, saved with the model); returns the removed parameters (for the engine's
    rebuild to forget). ``whole``: the prune so far in original indices (default: the plan), whose digest and
    kept layers are recorded."""
    removed_params = [p for i in plan.removed for p in decoder_layers(model)[i].parameters()]
    remove_layers(model, list(plan.removed))
    whole = whole or plan
    record: dict[str, Any] = {
        "plan_digest": whole.digest(),
        "kept_layers": list(whole.kept),
        "original_num_layers": whole.num_layers,
    }
    if prior:  # a model pruned before this run (prune_again): the record stays in the original model's terms
        kept = list(prior["kept_layers"])
        record = {
            "plan_digest": whole.digest(),
            "kept_layers": [kept[i] for i in whole.kept],
            "original_num_layers": int(prior["original_num_layers"]),
            "prunes": [*prior.get("prunes", [prior["plan_digest"]]), whole.digest()],
        }
    unwrap_model(model).config.gradpruner = record
    return removed_params


def count_params(model: nn.Module, backend: Any = None) -> int:
    """Number of parameters of the model as it is saved (whole tensors, also when the engine shards them:
    ``backend.global_numel``): peft LoRA adapters are not counted, since the saved model has them merged into
    the weights they adapt."""
    total = 0
    for name, p in model.named_parameters():
        if ".lora_" not in name:
            total += backend.global_numel(p) if backend is not None else p.numel()
    return total
