"""Tiny real HF models and data for fast tests (random init, fixed seeds)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 64


def tiny_llama_config(num_layers: int = 6, **kw) -> LlamaConfig:
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        attn_implementation="eager",
    )
    cfg.update(kw)
    return LlamaConfig(**cfg)


def tiny_llama(num_layers: int = 6, seed: int = 0, **kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(num_layers, **kw))
    # random init gives tiny weights; widen them so layers differ clearly in importance
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for p in layer.parameters():
                if p.dim() == 2:
                    p.mul_(1.0 + 0.5 * i)
    return model


def batches(n: int, batch: int = 4, seq: int = 12, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out
