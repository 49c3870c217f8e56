"""Architecture registry and layer surgery on tiny random models of every registered family."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from gradpruner_ds.arch import (  # noqa: E402
    ArchSpec,
    decoder_layers,
    get_arch,
    layer_linears,
    register_arch,
    unwrap_model,
)
from gradpruner_ds.errors import GradPrunerError  # noqa: E402
from gradpruner_ds.peft_support import linear_weight, lora_factors  # noqa: E402
from gradpruner_ds.surgery import remove_layers  # noqa: E402

N_LAYERS = 6
DROP = [1, 3]
KEPT = [0, 2, 4, 5]
VOCAB = 128

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=N_LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

# family -> (config class, model class, extra config kwargs). Sliding windows are short (4) so that the
# 16-token prompts and generations actually exercise sliding vs full attention.
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=False)),
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=4, tie_word_embeddings=True)),
    # Qwen: layers >= max_window_layers slide -> [F, F, F, S, S, S]
    "qwen2": (
        Qwen2Config,
        Qwen2ForCausalLM,
        dict(use_sliding_window=True, sliding_window=4, max_window_layers=3, tie_word_embeddings=True),
    ),
    "qwen3": (
        Qwen3Config,
        Qwen3ForCausalLM,
        dict(use_sliding_window=True, sliding_window=4, max_window_layers=3, head_dim=8),
    ),
    # Gemma2 default pattern alternates [S, F, S, F, S, F]
    "gemma2": (
        Gemma2Config,
        Gemma2ForCausalLM,
        dict(sliding_window=4, head_dim=8, query_pre_attn_scalar=8, attn_implementation="eager"),
    ),
    # Gemma3 with pattern 3 -> [S, S, F, S, S, F]
    "gemma3_text": (
        Gemma3TextConfig,
        Gemma3ForCausalLM,
        dict(sliding_window=4, sliding_window_pattern=3, head_dim=8, query_pre_attn_scalar=8),
    ),
}


def _build(family: str, **overrides) -> nn.Module:
    config_cls, model_cls, extra = FAMILIES[family]
    kwargs = {**_COMMON, **extra, **overrides}
    attn = kwargs.pop("attn_implementation", None)
    config = config_cls(**kwargs)
    if attn is not None:
        config._attn_implementation = attn
    torch.manual_seed(0)
    return model_cls(config).eval().float()


def _inputs(seed: int = 1, length: int = 16) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (2, length), generator=gen)


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


def _reference(family: str, orig_state: dict[str, torch.Tensor], orig_layer_types) -> nn.Module:
    """A fresh model built with the smaller config, holding the kept layers' original weights."""
    overrides: dict = {"num_hidden_layers": len(KEPT)}
    if orig_layer_types is not None:
        overrides["layer_types"] = [orig_layer_types[i] for i in KEPT]
    ref = _build(family, **overrides)
    new_of = {orig: new for new, orig in enumerate(KEPT)}
    pat = re.compile(r"^model\.layers\.(\d+)\.")
    state = {}
    for key, value in orig_state.items():
        m = pat.match(key)
        if m is None:
            state[key] = value
        elif int(m.group(1)) in new_of:
            state[pat.sub(f"model.layers.{new_of[int(m.group(1))]}.", key)] = value
    ref.load_state_dict(state, strict=True)
    return ref


@pytest.mark.parametrize("family", list(FAMILIES))
def test_registry_matches_real_modules(family: str) -> None:
    model = _build(family)
    spec = get_arch(model)
    assert spec is get_arch(model.config)
    layers = decoder_layers(model)
    assert len(layers) == N_LAYERS
    linears = layer_linears(layers[0], spec)
    assert list(linears) == list(spec.linear_names)
    assert all(isinstance(m, nn.Linear) for m in linears.values())
    assert set(spec.residual_writers) == {"self_attn.o_proj", "mlp.down_proj"}
    assert linear_weight(linears["mlp.down_proj"]).shape == (32, 64)
    assert lora_factors(linears["mlp.down_proj"]) is None


@pytest.mark.parametrize("family", list(FAMILIES))
def test_remove_layers_repairs_invariants(family: str, tmp_path) -> None:
    model = _build(family)
    config = model.config
    orig_types = copy.copy(getattr(config, "layer_types", None))
    if orig_types is not None:
        assert len(set(orig_types)) == 2 and len({orig_types[i] for i in KEPT}) == 2, orig_types
    orig_layers = list(decoder_layers(model))
    orig_state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = _inputs()

    kept = remove_layers(model, DROP)

    # 1. structural invariants
    assert kept == KEPT
    layers = decoder_layers(model)
    assert isinstance(layers, nn.ModuleList) and len(layers) == len(KEPT)
    assert all(layers[j] is orig_layers[i] for j, i in enumerate(KEPT))
    assert config.num_hidden_layers == len(KEPT)
    for j, layer in enumerate(layers):
        assert layer.self_attn.layer_idx == j
        if hasattr(layer, "layer_idx"):
            assert layer.layer_idx == j
    if orig_types is not None:
        assert list(config.layer_types) == [orig_types[i] for i in KEPT]
        for j, layer in enumerate(layers):
            assert layer.self_attn.layer_type == config.layer_types[j]
    if getattr(config, "max_window_layers", None) is not None:
        assert config.max_window_layers == sum(1 for i in KEPT if i < 3)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == bool(config.tie_word_embeddings)

    # 2. same computation as an independently built smaller model
    pruned_logits = _logits(model, ids)
    ref = _reference(family, orig_state, orig_types)
    torch.testing.assert_close(pruned_logits, _logits(ref, ids), atol=1e-6, rtol=0)

    # 3. save / reload round trip
    model.save_pretrained(tmp_path, safe_serialization=True)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert reloaded.config.num_hidden_layers == len(KEPT)
    assert getattr(reloaded.config, "layer_types", None) == getattr(config, "layer_types", None)
    torch.testing.assert_close(_logits(reloaded, ids), pruned_logits, atol=1e-6, rtol=0)

    # 4. KV cache indexing: greedy decoding with and without cache agrees
    prompt = _inputs(seed=2, length=6)
    common = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **common)
        uncached = model.generate(prompt, use_cache=False, **common)
    assert cached.shape[1] == prompt.shape[1] + 8
    assert torch.equal(cached, uncached)


def test_remove_nothing_is_a_noop() -> None:
    model = _build("llama")
    layers = decoder_layers(model)
    assert remove_layers(model, []) == list(range(N_LAYERS))
    assert decoder_layers(model) is layers and model.config.num_hidden_layers == N_LAYERS


@pytest.mark.parametrize(
    "drop, match",
    [
        ([N_LAYERS], "must be in"),
        ([-1], "must be in"),
        ([1, 1], "duplicates"),
        (list(range(N_LAYERS)), "cannot drop all"),
        (["1"], "integer layer indices"),
        ([True], "integer layer indices"),
    ],
)
def test_remove_layers_rejects_bad_input_before_changing(drop, match) -> None:
    model = _build("gemma3_text")
    layers = decoder_layers(model)
    types = list(model.config.layer_types)
    with pytest.raises(GradPrunerError, match=match) as info:
        remove_layers(model, drop)
    assert str(info.value).startswith("gradpruner:")
    assert decoder_layers(model) is layers
    assert model.config.num_hidden_layers == N_LAYERS and list(model.config.layer_types) == types


def test_unknown_family_is_a_user_error() -> None:
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB)
    with pytest.raises(GradPrunerError) as info:
        get_arch(config)
    msg = str(info.value)
    assert msg.startswith("gradpruner:") and "gpt2" in msg and "register_arch" in msg and "llama" in msg
    model = transformers.GPT2LMHeadModel(config)
    for fn in (decoder_layers, lambda m: remove_layers(m, [0])):
        with pytest.raises(GradPrunerError, match="^gradpruner:"):
            fn(model)


def test_not_a_model_is_a_user_error() -> None:
    with pytest.raises(GradPrunerError, match="^gradpruner:"):
        unwrap_model(nn.Linear(2, 2))


def test_register_arch_validates_and_serves_new_family() -> None:
    with pytest.raises(GradPrunerError, match="^gradpruner:"):
        register_arch(ArchSpec("bad", ("bad",), "model.layers", ("a",), ("b",)))
    spec = ArchSpec("gpt2", ("gpt2",), "transformer.h", ("attn.c_attn", "attn.c_proj"), ("attn.c_proj",), ())
    from gradpruner_ds import arch

    try:
        register_arch(spec)
        assert get_arch(GPT2Config()) is spec
    finally:
        arch._REGISTRY.pop("gpt2", None)


def test_empty_decoder_is_a_user_error() -> None:
    model = _build("llama")
    model.model.layers = nn.ModuleList()
    with pytest.raises(GradPrunerError, match="no decoder layers"):
        decoder_layers(model)


def test_layer_linears_missing_name_is_a_user_error() -> None:
    model = _build("llama")
    spec = ArchSpec("x", ("x",), "model.layers", ("self_attn.nope",), ())
    with pytest.raises(GradPrunerError, match="^gradpruner:.*self_attn.nope"):
        layer_linears(decoder_layers(model)[0], spec)


_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_peft_wrapped_llama() -> None:
    from peft import LoraConfig, PeftModel, get_peft_model

    base = _build("llama")
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=_LORA_TARGETS, init_lora_weights=False)
    )
    assert isinstance(model, PeftModel)
    assert unwrap_model(model) is base
    spec = get_arch(model)
    assert spec.name == "llama"
    layers = decoder_layers(model)
    assert layers is base.model.layers
    linears = layer_linears(layers[0], spec)
    for name, module in linears.items():
        factors = lora_factors(module)
        assert factors is not None, name
        a, b = factors
        w = linear_weight(module)
        assert w is module.base_layer.weight and not w.requires_grad
        assert a.shape == (4, w.shape[1]) and b.shape == (w.shape[0], 4)
        assert a.requires_grad and b.requires_grad
        assert lora_factors(module, adapter="missing") is None

    kept_lora = {j: layer_linears(layers[i], spec) for j, i in enumerate(KEPT)}
    assert remove_layers(model, DROP) == KEPT
    new_layers = decoder_layers(model)
    assert len(new_layers) == len(KEPT) and base.config.num_hidden_layers == len(KEPT)
    for j, layer in enumerate(new_layers):
        assert layer.self_attn.layer_idx == j
        now = layer_linears(layer, spec)
        assert all(now[n] is kept_lora[j][n] for n in spec.linear_names)
    ids = _inputs()
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert out.shape == (2, ids.shape[1], VOCAB) and torch.isfinite(out).all()
    # gradients still reach the kept LoRA factors
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    _, lora_b = lora_factors(layer_linears(new_layers[0], spec)["mlp.down_proj"])
    assert lora_b.grad is not None


def test_peft_layers_to_transform_and_patterns_are_renumbered(tmp_path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model

    base = _build("llama")
    cfg = LoraConfig(
        r=4,
        target_modules=_LORA_TARGETS,
        layers_to_transform=[0, 2, 3, 5],
        layers_pattern="layers",
        rank_pattern={"model.layers.5.mlp.down_proj": 2, "model.layers.3.mlp.up_proj": 2},
        init_lora_weights=False,
    )
    model = get_peft_model(base, cfg)
    remove_layers(model, DROP)
    new_cfg = model.peft_config["default"]
    assert new_cfg.layers_to_transform == [0, 1, 3]  # originals 0, 2, 5 survive (3 was dropped)
    assert new_cfg.rank_pattern == {"model.layers.3.mlp.down_proj": 2}
    ids = _inputs()
    with torch.no_grad():
        expected = model(input_ids=ids).logits

    # the saved pruned base + adapter reload into the same model
    copy.deepcopy(model).unload().save_pretrained(tmp_path / "base")  # the pruned base without LoRA
    model.save_pretrained(tmp_path / "adapter")
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, atol=1e-6, rtol=0)
    lora_layers = [i for i, layer in enumerate(decoder_layers(reloaded)) if lora_factors(layer.mlp.up_proj)]
    assert lora_layers == [0, 1, 3]
    assert lora_factors(decoder_layers(reloaded)[3].mlp.down_proj)[0].shape[0] == 2


def test_peft_layer_replication_is_rejected() -> None:
    from peft import LoraConfig, get_peft_model

    base = _build("llama")
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], layer_replication=[[0, 6]]))
    with pytest.raises(GradPrunerError, match="layer_replication"):
        remove_layers(model, [1])
