"""Architecture registry: where a model family keeps its decoder layers and which linears GradPruner scores.

Every helper accepts a plain Hugging Face CausalLM model or one wrapped by peft (``PeftModel`` /
``LoraModel``), DeepSpeed (engine ``.module``), DDP/FSDP (``.module``) or ``torch.compile``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel

from gradpruner_ds.errors import user_error
from gradpruner_ds.log import get_logger
from gradpruner_ds.peft_support import is_peft_model, is_peft_tuner

_log = get_logger("arch")

_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_LLAMA_LINEARS = _ATTN + _MLP
_LLAMA_WRITERS = ("self_attn.o_proj", "mlp.down_proj")

# Upper bound on nested wrappers unwrap_model will peel (guards against a wrapper that points at itself).
_MAX_WRAPPER_DEPTH = 16


@dataclass(frozen=True)
class ArchSpec:
    """How one decoder-only model family is laid out.

    ``layers_path`` is the dotted path from the HF CausalLM model to the decoder ``nn.ModuleList``;
    ``linear_names`` are the scored linear sublayers of one decoder layer (relative to the layer);
    ``residual_writers`` is the subset of them that writes into the residual stream;
    ``per_layer_config_lists`` names config attributes holding one entry per decoder layer.
    """

    name: str
    model_types: tuple[str, ...]
    layers_path: str
    linear_names: tuple[str, ...]
    residual_writers: tuple[str, ...]
    per_layer_config_lists: tuple[str, ...] = ("layer_types",)
    mlp_branch: str | None = "mlp"
    """The module whose output the decoder layer adds to the residual stream as its MLP branch, as it is (no
    norm after it), or None; ``repair`` folds its map into that branch's last linear, ``mlp_writer``."""
    mlp_writer: str = "mlp.down_proj"


_REGISTRY: dict[str, ArchSpec] = {}


def register_arch(spec: ArchSpec) -> None:
    """Register (or replace) ``spec`` for every HF ``model_type`` in ``spec.model_types``."""
    if not spec.model_types:
        raise user_error("ArchSpec.model_types must name at least one HF model_type", spec.name, "add one")
    if not spec.layers_path or any(not part for part in spec.layers_path.split(".")):
        raise user_error(
            "ArchSpec.layers_path must be a dotted attribute path", spec.layers_path, "e.g. 'model.layers'"
        )
    if not spec.linear_names:
        raise user_error("ArchSpec.linear_names must not be empty", spec.name, "list the scored linears")
    if len(set(spec.linear_names)) != len(spec.linear_names):
        raise user_error("ArchSpec.linear_names has duplicates", spec.linear_names, "list each name once")
    missing = [w for w in spec.residual_writers if w not in spec.linear_names]
    if missing:
        raise user_error(
            "ArchSpec.residual_writers must be a subset of linear_names",
            missing,
            "add them to linear_names or remove them from residual_writers",
        )
    for model_type in spec.model_types:
        old = _REGISTRY.get(model_type)
        if old is not None and old != spec:
            _log.debug("replacing arch spec for model_type %r (%s -> %s)", model_type, old.name, spec.name)
        _REGISTRY[model_type] = spec


def registered_model_types() -> list[str]:
    """The HF ``model_type`` values that currently have an ArchSpec, sorted."""
    return sorted(_REGISTRY)


def _inner(obj: Any) -> Any:
    """The object one wrapper level below ``obj``, or None when ``obj`` is not a known wrapper."""
    if is_peft_model(obj):
        return obj.base_model
    if is_peft_tuner(obj):
        return obj.model
    if isinstance(getattr(obj, "_orig_mod", None), nn.Module):  # torch.compile
        return obj._orig_mod
    if isinstance(getattr(obj, "module", None), nn.Module):  # DeepSpeed engine, DDP, FSDP(1)
        return obj.module
    return None


def wrapper_chain(model: Any) -> list[Any]:
    """``model`` followed by each object it wraps, ending at the HF model when there is one."""
    chain = [model]
    for _ in range(_MAX_WRAPPER_DEPTH):
        if isinstance(chain[-1], PreTrainedModel):
            break
        inner = _inner(chain[-1])
        if inner is None:
            break
        chain.append(inner)
    return chain


def unwrap_model(model: Any) -> PreTrainedModel:
    """The HF CausalLM model inside ``model`` (peft, DeepSpeed, DDP/FSDP and torch.compile wrappers removed)."""
    last = wrapper_chain(model)[-1]
    if isinstance(last, PreTrainedModel):
        return last
    raise user_error(
        "expected a Hugging Face PreTrainedModel (optionally wrapped by peft/DeepSpeed/DDP/FSDP)",
        type(model).__name__,
        "pass the model returned by AutoModelForCausalLM.from_pretrained (or its peft/DeepSpeed wrapper)",
    )


def _config_of(model_or_config: Any) -> PreTrainedConfig:
    if isinstance(model_or_config, PreTrainedConfig):
        return model_or_config
    return unwrap_model(model_or_config).config


def get_arch(model_or_config: Any) -> ArchSpec:
    """The ArchSpec for an HF model, a peft-wrapped one, or a ``PreTrainedConfig``."""
    config = _config_of(model_or_config)
    model_type = getattr(config, "model_type", None)
    spec = _REGISTRY.get(model_type) if model_type else None
    if spec is None:
        raise user_error(
            f"unsupported model family; supported model_types are {registered_model_types()}",
            model_type,
            "register it with gradpruner_ds.arch.register_arch(ArchSpec(name=..., model_types=(...,), "
            "layers_path=..., linear_names=(...), residual_writers=(...)))",
        )
    return spec


def _resolve_path(root: nn.Module, dotted: str) -> Any:
    obj: Any = root
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def decoder_layers(model: Any) -> nn.ModuleList:
    """The decoder-layer ``nn.ModuleList`` of an HF (or wrapped) CausalLM model."""
    hf_model = unwrap_model(model)
    spec = get_arch(hf_model.config)
    layers = _resolve_path(hf_model, spec.layers_path)
    if not isinstance(layers, nn.ModuleList):
        raise user_error(
            f"model with no decoder layers at '{spec.layers_path}' ({spec.name} layout)",
            type(layers).__name__ if layers is not None else None,
            "check that the model is a CausalLM of the registered family, or fix ArchSpec.layers_path",
        )
    if len(layers) == 0:
        raise user_error(
            "model with no decoder layers",
            0,
            "load a model that still has at least one decoder layer",
        )
    return layers


def layer_linears(layer: nn.Module, spec: ArchSpec) -> dict[str, nn.Module]:
    """Map each of ``spec.linear_names`` to its module in ``layer`` (an nn.Linear or a peft layer wrapping one)."""
    out: dict[str, nn.Module] = {}
    for name in spec.linear_names:
        try:
            out[name] = layer.get_submodule(name)
        except AttributeError:
            raise user_error(
                f"decoder layer ({type(layer).__name__}) has no sublayer '{name}' expected by arch '{spec.name}'",
                name,
                "fix ArchSpec.linear_names for this family (see the model's modeling_*.py)",
            ) from None
    return out


def _llama_like(name: str, model_types: tuple[str, ...], mlp_branch: str | None = "mlp") -> ArchSpec:
    return ArchSpec(
        name=name,
        model_types=model_types,
        layers_path="model.layers",
        linear_names=_LLAMA_LINEARS,
        residual_writers=_LLAMA_WRITERS,
        mlp_branch=mlp_branch,
    )


# Module names checked against transformers 5.24 modeling_<family>.py: every family below uses
# self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj. Qwen3/Gemma3 q_norm/k_norm and the Gemma
# pre/post feed-forward norms are norms, not scored linears. Qwen2/Qwen3/Gemma2/Gemma3 configs hold
# ``layer_types`` (sliding vs full attention per layer); Llama and Mistral configs have no per-layer
# list (surgery skips list names a config does not carry).
for _spec in (
    _llama_like("llama", ("llama",)),
    _llama_like("mistral", ("mistral",)),
    _llama_like("qwen2", ("qwen2",)),
    _llama_like("qwen3", ("qwen3",)),
    # Gemma2/3 normalise the MLP branch (post_feedforward_layernorm) before the residual add: no linear fold
    _llama_like("gemma2", ("gemma2",), mlp_branch=None),
    # Gemma3ForCausalLM + Gemma3TextConfig (model_type "gemma3_text"); the multimodal "gemma3"
    # (Gemma3ForConditionalGeneration) nests its decoder elsewhere and is not registered.
    _llama_like("gemma3", ("gemma3_text",), mlp_branch=None),
):
    register_arch(_spec)
del _spec
