"""Every shipped config validates, and the model-size configs give the budgets they state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gradpruner_ds.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.json"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_validates(path):
    d = json.loads(path.read_text())
    block = d if "zero_optimization" not in d and "gradpruner" not in d else d.get("gradpruner")
    if block is None:
        pytest.skip("no gradpruner block")
    cfg = load_config({"gradpruner": block})
    assert cfg is not None


@pytest.mark.parametrize(
    "name,layers,want",
    [
        ("llama3.1-8b_zero2_1node.json", 32, (10, 3)),
        ("mistral-7b_zero2_1node.json", 32, (10, 3)),
        ("qwen2.5-7b_zero2_1node.json", 28, (8, 3)),
        ("qwen3-8b_zero3_2nodes.json", 36, (11, 3)),
        ("llama3.1-70b_zero3_8nodes.json", 80, (29, 3)),
    ],
)
def test_model_configs_give_the_stated_budget(name, layers, want):
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / name)
    assert cfg.resolve_budget(layers) == want
