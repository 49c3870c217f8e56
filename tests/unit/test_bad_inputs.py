"""The bad-input table (docs/reliability.md): every bad input gives a ``gradpruner:`` error that names
the problem and the fix, before any training step, with nothing written."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers.tiny import batches, tiny_llama

from gradpruner_ds.checkpoint import load_pruner_state, save_pruner_state
from gradpruner_ds.config import GradPrunerConfig, load_config
from gradpruner_ds.core.plan import PrunePlan, make_plan
from gradpruner_ds.pruner import GradPruner
from gradpruner_ds.surgery import remove_layers

ROOT = Path(__file__).resolve().parents[2]
OK = {"window_steps": 2, "num_drop": 1}


def cfg(**kw) -> GradPrunerConfig:
    return GradPrunerConfig.from_dict({**OK, **kw})


def pruner(model=None, total_steps: int | None = 10, **kw) -> GradPruner:
    return GradPruner(model if model is not None else tiny_llama(4), cfg(**kw), total_steps=total_steps)


def _observed(tmp: Path, **kw) -> GradPruner:
    model = tiny_llama(4)
    p = GradPruner(model, cfg(**kw), total_steps=10)
    for b in batches(2):
        model(**b).loss.backward()
        p.observe()
        model.zero_grad()
    return p


def _json_file(tmp: Path, text: str) -> None:
    (tmp / "c.json").write_text(text)
    load_config(tmp / "c.json")


def _plan_text() -> str:
    return make_plan(
        [1.0, 2.0, 3.0, 4.0], 1, 0, criterion="igia_sum", observed_steps=2, skipped_steps=0, step=2, config_digest="x"
    ).to_json()


def _nonfinite() -> None:
    model = tiny_llama(4)
    p = GradPruner(model, cfg(), total_steps=10)
    for b in batches(2):
        model(**b).loss.backward()
        model.model.layers[0].mlp.up_proj.weight.grad.fill_(float("nan"))
        p.observe()
        model.zero_grad()
    p.maybe_prune()


def _no_layers() -> None:
    model = tiny_llama(4)
    model.model.layers = torch.nn.ModuleList()
    pruner(model)


def _lora_without_adapters() -> None:
    pruner(mode="lora", criterion="igia_sum")


def _frozen_full_mode() -> None:
    model = tiny_llama(4)
    model.model.layers[2].mlp.down_proj.weight.requires_grad_(False)
    pruner(model, criterion="igia_sum")


def _unknown_family() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    pruner(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50)))


def _zero0(tmp: Path) -> None:
    import torch

    from gradpruner_ds.backends import backend_for

    class Engine:  # only what the picker reads: the stage check comes first
        module = torch.nn.Linear(1, 1)

        def zero_optimization_stage(self) -> int:
            return 0

    backend_for(Engine(), ds_config={})


def _world_changed(tmp: Path) -> None:
    p = _observed(tmp)
    save_pruner_state(p, tmp / "ck")
    state = json.loads((tmp / "ck" / "state.json").read_text())
    state["world_size"] = 8
    (tmp / "ck" / "state.json").write_text(json.dumps(state))
    load_pruner_state(_observed(tmp), tmp / "ck")


def _ckpt_version(tmp: Path) -> None:
    p = _observed(tmp)
    save_pruner_state(p, tmp / "ck")
    state = json.loads((tmp / "ck" / "state.json").read_text())
    state["schema_version"] = 0
    (tmp / "ck" / "state.json").write_text(json.dumps(state))
    load_pruner_state(_observed(tmp), tmp / "ck")


def _ckpt_other_config(tmp: Path) -> None:
    save_pruner_state(_observed(tmp), tmp / "ck")
    load_pruner_state(_observed(tmp, keep_fraction=0.5), tmp / "ck")


def _ckpt_truncated_igia(tmp: Path) -> None:
    save_pruner_state(_observed(tmp), tmp / "ck")
    f = tmp / "ck" / "stats_rank0.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    load_pruner_state(_observed(tmp), tmp / "ck")


def _ckpt_missing(tmp: Path) -> None:
    load_pruner_state(_observed(tmp), tmp / "nothing-here")


def _plan_other_model(tmp: Path) -> None:
    p = pruner(tiny_llama(4))
    plan = make_plan([1.0] * 6, 1, 0, criterion="igia_sum", observed_steps=1, skipped_steps=0, step=1, config_digest="x")
    p.replay(plan)


# (id, the bad input, the callable that must raise, a phrase the message must contain)
CASES: list[tuple[str, str, Callable[..., object], str]] = [
    ("cfg-window-zero", "window_steps: 0", lambda t: cfg(window_steps=0), "'window_steps'"),
    ("cfg-window-type", 'window_steps: "ten"', lambda t: cfg(window_steps="ten"), "'window_steps'"),
    ("cfg-keep-zero", "keep_fraction: 0", lambda t: cfg(keep_fraction=0), "'keep_fraction'"),
    ("cfg-keep-big", "keep_fraction: 1.5", lambda t: cfg(keep_fraction=1.5), "'keep_fraction'"),
    ("cfg-merge-negative", "num_merge: -1", lambda t: cfg(num_merge=-1), "'num_merge'"),
    ("cfg-drop-type", "num_drop: 2.5", lambda t: cfg(num_drop=2.5), "'num_drop'"),
    ("cfg-mode", 'mode: "qlora"', lambda t: cfg(mode="qlora"), "'mode'"),
    ("cfg-criterion", 'criterion: "magic"', lambda t: cfg(criterion="magic"), "criterion must be one of"),
    ("cfg-unknown-key", "a misspelled key (keep_frac)", lambda t: cfg(keep_frac=0.3), "unknown key 'keep_frac'"),
    ("cfg-two-windows", "window_steps and window_fraction", lambda t: cfg(window_fraction=0.1), "exactly one of window_steps"),
    ("cfg-no-window", "no window", lambda t: GradPrunerConfig.from_dict({"num_drop": 1}), "exactly one of window_steps"),
    ("cfg-two-budgets", "num_drop and prune_ratio", lambda t: cfg(prune_ratio=0.2), "exactly one of num_drop"),
    ("cfg-no-budget", "no budget", lambda t: GradPrunerConfig.from_dict({"window_steps": 2}), "exactly one of num_drop"),
    ("cfg-ratio-one", "prune_ratio: 1.0", lambda t: cfg(num_drop=None, prune_ratio=1.0), "'prune_ratio'"),
    ("cfg-timeout", "consensus_timeout_s: 0", lambda t: cfg(consensus_timeout_s=0), "'consensus_timeout_s'"),
    ("cfg-bool-type", 'sign_consistent: "maybe"', lambda t: cfg(sign_consistent="maybe"), "'sign_consistent'"),
    ("cfg-bool-for-int", "num_drop: true (a boolean where an integer belongs)", lambda t: cfg(num_drop=True), "'num_drop'"),
    ("cfg-string-for-int", 'num_drop: "2" (a string where an integer belongs)', lambda t: cfg(num_drop="2"), "'num_drop'"),
    ("cfg-int-for-bool", "sign_consistent: 1 (an integer where a boolean belongs)", lambda t: cfg(sign_consistent=1), "'sign_consistent'"),
    ("cfg-duplicate-key", "num_drop twice in the block of a DeepSpeed config file", lambda t: _json_file(t, '{"gradpruner": {"window_steps": 2, "num_drop": 1, "num_drop": 3}}'), "'num_drop' twice"),
    ("cfg-two-blocks", 'two "gradpruner" blocks in a DeepSpeed config file', lambda t: _json_file(t, '{"gradpruner": {"window_steps": 2, "num_drop": 1}, "gradpruner": {"window_steps": 2, "num_drop": 3}}'), "'gradpruner' twice"),
    ("cfg-given-and-criterion", "layers_to_remove together with a criterion", lambda t: GradPrunerConfig.from_dict({"window_steps": 2, "layers_to_remove": [1], "criterion": "obd"}), "do not apply"),
    ("cfg-given-and-protected", "a layer both in layers_to_remove and protect_layers", lambda t: GradPrunerConfig.from_dict({"window_steps": 2, "layers_to_remove": [1], "protect_layers": [1]}), "both in layers_to_remove"),
    ("cfg-layer-out-of-range", "protect_layers naming a layer the model does not have", lambda t: pruner(protect_layers=[7]), "decoder-layer indices in [0, 4)"),
    ("cfg-protect-too-many", "protect_layers leaving too few layers for the budget", lambda t: pruner(num_drop=2, protect_layers=[0, 1, 2]), "must fit among"),
    ("cfg-recovery-range", "recovery: {distill_steps: 0} (out of range)", lambda t: cfg(recovery={"distill_steps": 0}), "'recovery.distill_steps': Input should be greater than or equal to 1 (got 0). Fix: set 'recovery.distill_steps' as documented"),
    ("cfg-recovery-weight", "recovery: {weight: 2} (out of range)", lambda t: cfg(recovery={"distill_steps": 4, "weight": 2.0}), "'recovery.weight': Input should be less than or equal to 1 (got 2.0). Fix: set 'recovery.weight' as documented: A number in (0, 1]"),
    ("cfg-recovery-typo", 'recovery: {"distill_step": 4} (a misspelled sub-block key)', lambda t: cfg(recovery={"distill_step": 4}), "did you mean 'distill_steps'"),
    ("cfg-temperature-inf", 'recovery: {temperature: Infinity} (JSON Infinity in a DeepSpeed config file)', lambda t: _json_file(t, '{"gradpruner": {"window_steps": 2, "num_drop": 1, "recovery": {"distill_steps": 2, "temperature": Infinity}}}'), "'recovery.temperature': Input should be a finite number"),
    ("cfg-temperature-huge", "recovery: {temperature: 1e200} (T^2 overflows: a NaN loss)", lambda t: cfg(recovery={"distill_steps": 2, "temperature": 1e200}), "'recovery.temperature': Input should be less than or equal to 100"),
    ("cfg-temperature-tiny", "recovery: {temperature: 1e-45} (logits / T overflow: a NaN loss)", lambda t: cfg(recovery={"distill_steps": 2, "temperature": 1e-45}), "'recovery.temperature': Input should be greater than or equal to 0.1"),
    ("cfg-timeout-tiny", "consensus_timeout_s: 1e-7 (was timedelta(0): no limit)", lambda t: cfg(consensus_timeout_s=1e-7), "'consensus_timeout_s': Input should be greater than or equal to 1"),
    ("cfg-float-nan", "keep_fraction: NaN (any float option: inf, -inf, NaN)", lambda t: cfg(keep_fraction=float("nan")), "'keep_fraction': Input should be a finite number"),
    ("cfg-output-dir-empty", 'output_dir: "" (would write into the current directory)', lambda t: cfg(output_dir=""), "output_dir must name a folder"),
    ("block-not-object", '"gradpruner": [1, 2]', lambda t: load_config({"gradpruner": [1]}), "must be a JSON object"),
    ("block-misspelled", '"grad_pruner": {...}', lambda t: load_config({"grad_pruner": OK}), "looks like a misspelling"),
    ("block-missing", "--gradpruner without a block", lambda t: load_config({"train_batch_size": 8}), "needs a 'gradpruner' block"),
    ("ds-config-json", "a DeepSpeed config that is not JSON", lambda t: (t / "c.json").write_text("{") and load_config(t / "c.json"), "must be valid JSON"),
    ("ds-config-missing", "a DeepSpeed config path that does not exist", lambda t: load_config(t / "no.json"), "must exist"),
    ("budget-all-layers", "num_drop = number of layers", lambda t: pruner(num_drop=4), "must leave at least 1"),
    ("budget-nothing", "num_drop: 0 and no merge", lambda t: pruner(num_drop=0), "removes no layer"),
    ("budget-ratio-merge", "prune_ratio too small for num_merge", lambda t: pruner(num_drop=None, prune_ratio=0.25, num_merge=2), "must cover num_merge"),
    ("window-too-long", "a window as long as the run", lambda t: pruner(total_steps=2), "must end before"),
    ("window-fraction-no-total", "window_fraction without total_steps", lambda t: GradPruner(tiny_llama(4), GradPrunerConfig.from_dict({"window_fraction": 0.1, "num_drop": 1})), "needs the run's total"),
    ("model-family", "a model family without a locator (GPT-2)", lambda t: _unknown_family(), "register_arch"),
    ("model-no-layers", "a model with no decoder layers", lambda t: _no_layers(), "no decoder layers"),
    ("lora-no-adapters", "mode lora on a model without LoRA adapters", lambda t: _lora_without_adapters(), "needs peft LoRA adapters"),
    ("full-frozen", "mode full with frozen linear weights", lambda t: _frozen_full_mode(), "some are frozen"),
    ("zero-stage", "ZeRO stage 0 (no partitioning)", _zero0, "supports ZeRO stages 1, 2 and 3"),
    ("nonfinite-window", "non-finite gradients in every observed step", lambda t: _nonfinite(), "at least one step with finite gradients"),
    ("surgery-range", "removing a layer index out of range", lambda t: remove_layers(tiny_llama(4), [9]), "gradpruner:"),
    ("surgery-dup", "removing the same layer twice", lambda t: remove_layers(tiny_llama(4), [1, 1]), "gradpruner:"),
    ("plan-corrupt", "a plan file that is not JSON", lambda t: PrunePlan.from_json("{oops"), "must be valid JSON"),
    ("plan-truncated", "a truncated plan file", lambda t: PrunePlan.from_json(_plan_text()[:-40]), "must be valid JSON"),
    ("plan-edited", "a plan whose content no longer matches its digest", lambda t: PrunePlan.from_json(_plan_text().replace('"step": 2', '"step": 3')), "digest must match"),
    ("plan-fields", "a plan missing fields", lambda t: PrunePlan.from_dict({"schema_version": 1}), "must hold every PrunePlan field"),
    ("plan-other-model", "a plan made for another model", _plan_other_model, "same model and gradpruner settings"),
    ("ckpt-world-size", "a world size that changed on resume inside the window", _world_changed, "same world size"),
    ("ckpt-version", "a checkpoint from another GradPruner state version", _ckpt_version, "schema_version"),
    ("ckpt-config", "resuming with other gradpruner settings", _ckpt_other_config, "must be the same as when"),
    ("ckpt-truncated", "a truncated per-rank statistics file", _ckpt_truncated_igia, "valid safetensors"),
    ("ckpt-missing", "a checkpoint folder without GradPruner state", _ckpt_missing, "must contain state.json"),
]


@pytest.mark.parametrize("case_id,what,fn,phrase", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_a_clear_error_and_writes_nothing(tmp_path, case_id, what, fn, phrase):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError) as exc:
        fn(out)
    msg = str(exc.value)
    assert msg.startswith("gradpruner:"), msg
    assert phrase in msg, msg
    assert "Fix:" in msg or "fix" in msg.lower(), msg
    # nothing but the inputs the case itself prepared
    written = {p.name for p in out.rglob("*")} - {"c.json", "ck", "state.json", "stats_rank0.safetensors"}
    assert not written, written


def test_table_has_at_least_25_cases_and_every_case_is_documented():
    assert len(CASES) >= 25
    doc = (ROOT / "docs" / "reliability.md").read_text()
    missing = [c[0] for c in CASES if f"`{c[0]}`" not in doc]
    assert not missing, f"document these cases in docs/reliability.md: {missing}"
