"""The "gradpruner" block: strict validation with gradpruner: errors naming rule, value and fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gradpruner_ds.config import GradPrunerConfig, config_reference_markdown, load_config

ROOT = Path(__file__).resolve().parents[2]
GOOD = {"window_steps": 4, "num_drop": 2}


def test_good_block_and_defaults():
    cfg = GradPrunerConfig.from_dict(GOOD)
    assert cfg.keep_fraction == 0.2 and cfg.num_merge == 0 and cfg.sign_consistent
    assert cfg.resolve_budget(8) == (2, 0)
    assert cfg.resolve_window(100) == 4


@pytest.mark.parametrize(
    "block,needle",
    [
        ({**GOOD, "window_steps": 0}, "'window_steps': Input should be greater than or equal to 1 (got 0)"),
        ({**GOOD, "window_steps": "x"}, "'window_steps'"),
        ({**GOOD, "keep_fraction": 0.0}, "'keep_fraction'"),
        ({**GOOD, "keep_fraction": 1.5}, "'keep_fraction'"),
        ({**GOOD, "num_merge": -1}, "'num_merge'"),
        ({**GOOD, "mode": "qlora"}, "'mode'"),
        ({**GOOD, "criterion": "magic"}, "criterion must be one of"),
        ({**GOOD, "keep_frac": 0.3}, "unknown key 'keep_frac'"),
        ({"num_drop": 2}, "set exactly one of window_steps or window_fraction"),
        ({**GOOD, "window_fraction": 0.1}, "set exactly one of window_steps or window_fraction"),
        ({"window_steps": 3}, "set exactly one of num_drop or prune_ratio"),
        ({**GOOD, "prune_ratio": 0.3}, "set exactly one of num_drop or prune_ratio"),
        ({"window_steps": 3, "prune_ratio": 1.0}, "'prune_ratio'"),
        ({**GOOD, "consensus_timeout_s": 0}, "'consensus_timeout_s'"),
    ],
)
def test_bad_values_raise_gradpruner_errors(block, needle):
    with pytest.raises(ValueError) as exc:
        GradPrunerConfig.from_dict(block)
    msg = str(exc.value)
    assert msg.startswith("gradpruner:")
    assert needle in msg
    assert "Fix:" in msg


def test_unknown_key_suggests_the_right_name():
    with pytest.raises(ValueError, match="did you mean 'keep_fraction'"):
        GradPrunerConfig.from_dict({**GOOD, "keep_frac": 0.3})


def test_budget_must_leave_a_layer():
    with pytest.raises(ValueError, match=r"^gradpruner: the budget must leave at least 1"):
        GradPrunerConfig.from_dict({"window_steps": 2, "num_drop": 3, "num_merge": 1}).resolve_budget(4)
    with pytest.raises(ValueError, match=r"^gradpruner: the budget removes no layer"):
        GradPrunerConfig.from_dict({"window_steps": 2, "num_drop": 0}).resolve_budget(4)
    with pytest.raises(ValueError, match=r"^gradpruner: prune_ratio x 10 layers must cover num_merge"):
        GradPrunerConfig.from_dict({"window_steps": 2, "prune_ratio": 0.1, "num_merge": 2}).resolve_budget(10)
    # ratio: 13 of 32 layers at 40% (the paper's headline), 10 dropped + 3 merged
    assert GradPrunerConfig.from_dict({"window_steps": 2, "prune_ratio": 0.4, "num_merge": 3}).resolve_budget(
        32
    ) == (10, 3)


def test_window_must_fit_the_run():
    with pytest.raises(ValueError, match=r"^gradpruner: the observation window must end before"):
        GradPrunerConfig.from_dict({"window_steps": 10, "num_drop": 1}).resolve_window(10)
    with pytest.raises(ValueError, match=r"^gradpruner: window_fraction needs the run's total"):
        GradPrunerConfig.from_dict({"window_fraction": 0.01, "num_drop": 1}).resolve_window(None)
    assert GradPrunerConfig.from_dict({"window_fraction": 0.01, "num_drop": 1}).resolve_window(400) == 4


def test_block_from_deepspeed_config(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 8, "gradpruner": GOOD}))
    assert load_config(path) == GradPrunerConfig.from_dict(GOOD)
    with pytest.raises(
        ValueError, match=r"^gradpruner: the config has no 'gradpruner' block but a key that looks"
    ):
        load_config({"train_batch_size": 8, "grad_pruner": GOOD})
    with pytest.raises(
        ValueError, match=r"^gradpruner: the config has no 'gradpruner' block but a key that looks"
    ):
        load_config({"train_batch_size": 8, "gradprunner": GOOD})
    with pytest.raises(ValueError, match=r"^gradpruner: --gradpruner needs a 'gradpruner' block"):
        load_config({"train_batch_size": 8})
    assert load_config({"train_batch_size": 8}, required=False) is None
    with pytest.raises(ValueError, match=r"^gradpruner: the 'gradpruner' block must be a JSON object"):
        load_config({"gradpruner": [1, 2]})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"^gradpruner: the DeepSpeed config must be valid JSON"):
        load_config(bad)
    with pytest.raises(ValueError, match=r"^gradpruner: the DeepSpeed config file must exist"):
        load_config(tmp_path / "missing.json")


def test_config_digest_ignores_output_only_settings():
    a = GradPrunerConfig.from_dict(GOOD)
    assert (
        a.config_digest()
        == GradPrunerConfig.from_dict({**GOOD, "output_dir": "/tmp/x", "plot": False}).config_digest()
    )
    assert a.config_digest() != GradPrunerConfig.from_dict({**GOOD, "keep_fraction": 0.3}).config_digest()


def test_every_field_is_documented_and_the_reference_is_in_sync():
    for name, field in GradPrunerConfig.model_fields.items():
        assert field.description, name
    table = config_reference_markdown()
    assert table in (ROOT / "docs" / "config.md").read_text(), "run: python -m gradpruner_ds.config > table"
    assert table in (ROOT / "README.md").read_text()
