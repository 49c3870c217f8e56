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
    readme = (ROOT / "README.md").read_text()
    assert "docs/config.md" in readme and len(readme.splitlines()) <= 150  # the README links the table


# ---- every number has a finite range that makes sense ------------------------------------------------
def _float_fields() -> list[tuple[str, object]]:
    """``(key, field)`` of every float option, sub-blocks' included (``recovery.temperature``, ...)."""
    import typing

    from gradpruner_ds.config import SUB_BLOCKS

    def is_float(f) -> bool:
        return f.annotation is float or float in typing.get_args(f.annotation)

    out = [(k, f) for k, f in GradPrunerConfig.model_fields.items() if is_float(f)]
    for block, model in SUB_BLOCKS.items():
        out += [(f"{block}.{k}", f) for k, f in model.model_fields.items() if is_float(f)]
    return out


def _with(key: str, value: object) -> dict:
    """A valid block with ``key`` (dotted for a sub-block) set to ``value``."""
    base: dict = {"window_steps": 4, "num_drop": 2}
    if key in ("window_fraction",):
        base.pop("window_steps")
    if key in ("prune_ratio",):
        base.pop("num_drop")
    if "." in key:
        block, sub = key.split(".")
        base[block] = {"recovery": {"distill_steps": 2}, "repair": {"steps": 2}}[block] | {sub: value}
    else:
        base[key] = value
    return base


@pytest.mark.parametrize("key", [k for k, _ in _float_fields()])
def test_every_float_option_has_a_finite_range_and_refuses_inf_and_nan(key):
    import annotated_types

    field = dict(_float_fields())[key]
    low = [m for m in field.metadata if isinstance(m, annotated_types.Ge | annotated_types.Gt)]
    high = [m for m in field.metadata if isinstance(m, annotated_types.Le | annotated_types.Lt)]
    assert low and high, f"{key} needs a lower and an upper bound"
    for value in (float("inf"), float("-inf"), float("nan")):
        with pytest.raises(ValueError) as exc:
            GradPrunerConfig.from_dict(_with(key, value))
        msg = str(exc.value)
        assert msg.startswith("gradpruner:") and f"'{key}'" in msg and "Fix:" in msg, msg


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("recovery.temperature", 1e200, "less than or equal to 100"),
        ("recovery.temperature", 1e-45, "greater than or equal to 0.1"),
        ("consensus_timeout_s", 1e-7, "greater than or equal to 1"),
        ("consensus_timeout_s", 1e-300, "greater than or equal to 1"),
        ("output_dir", "", "output_dir must name a folder"),
        ("output_dir", "  ", "output_dir must name a folder"),
    ],
)
def test_values_that_used_to_be_accepted_and_break_the_run(key, value, needle):
    """1e200 / 1e-45 made the distillation loss NaN; a timeout of 1e-7 s became timedelta(0) = no limit; an
    empty output_dir wrote the report into the current directory."""
    with pytest.raises(ValueError) as exc:
        GradPrunerConfig.from_dict(_with(key, value))
    assert str(exc.value).startswith("gradpruner:") and needle in str(exc.value)


def test_the_distillation_loss_is_finite_over_the_whole_temperature_range():
    import torch

    from gradpruner_ds.recovery import distill_kl

    torch.manual_seed(0)
    student, teacher = ((torch.randn(2, 6, 4096) * 3000).to(torch.bfloat16) for _ in range(2))
    mask = torch.ones(2, 6)
    for t in (0.1, 1.0, 2.0, 100.0):
        assert torch.isfinite(distill_kl(student, teacher, mask, t)), t
    GradPrunerConfig.from_dict(_with("recovery.temperature", 0.1))
    GradPrunerConfig.from_dict(_with("recovery.temperature", 100.0))
    GradPrunerConfig.from_dict(_with("consensus_timeout_s", 1.0))
