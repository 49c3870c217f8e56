"""``gradpruner-ds apply`` (a saved plan onto a saved dense checkpoint, e.g. an observe_only run's decision) and
``gradpruner-ds config`` (the configs shipped in the package)."""

from __future__ import annotations

import pytest
import torch
from helpers.tiny import batches, tiny_llama
from transformers import AutoModelForCausalLM

from gradpruner_ds.cli import main
from gradpruner_ds.config import GradPrunerConfig
from gradpruner_ds.pruner import GradPruner
from gradpruner_ds.surgery import remove_layers


def _observe_only_plan(tmp_path, **kw):
    model = tiny_llama(6)
    cfg = {"window_steps": 2, "num_drop": 2, "observe_only": True, "progress_bar": False, "plot": False,
           "output_dir": str(tmp_path / "report"), **kw}  # fmt: skip
    pruner = GradPruner(model, GradPrunerConfig.from_dict(cfg))
    for b in batches(2):
        model(**b).loss.backward()
        pruner.observe()
        model.zero_grad()
        pruner.maybe_prune()
    model.save_pretrained(tmp_path / "dense")
    return pruner.plan, tmp_path / "report" / "gradpruner_plan.json"


def test_apply_writes_the_pruned_model_of_an_observe_only_run(tmp_path, capsys):
    plan, plan_file = _observe_only_plan(tmp_path)
    assert main(["apply", str(plan_file), str(tmp_path / "dense"), str(tmp_path / "out")]) == 0
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    expect = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    remove_layers(expect, list(plan.removed))
    ids = batches(1)[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, expect(ids).logits)
    assert pruned.config.gradpruner["kept_layers"] == list(plan.kept)
    assert "removed layers" in capsys.readouterr().out


def test_apply_checks_everything_before_loading(tmp_path, capsys):
    plan, plan_file = _observe_only_plan(tmp_path, num_merge=1, num_drop=1)
    small = tmp_path / "small"
    tiny_llama(4).save_pretrained(small)
    capsys.readouterr()  # the saves' progress bars
    cases = [
        ([str(tmp_path / "nope.json"), str(tmp_path / "dense"), str(tmp_path / "o1")], "the plan must be a file"),
        ([str(plan_file), str(tmp_path / "nothing"), str(tmp_path / "o2")], "must be a from_pretrained folder"),
        ([str(plan_file), str(small), str(tmp_path / "o3")], "plan for 6 layers"),
        ([str(plan_file), str(tmp_path / "dense"), str(tmp_path / "o4")], "pass --drop-merged"),
    ]
    for argv, msg in cases:
        assert main(["apply", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("gradpruner:") and msg in err, err
        assert not (tmp_path / argv[2]).exists()
    assert main(["apply", str(plan_file), str(tmp_path / "dense"), str(tmp_path / "o5"), "--drop-merged"]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "o5").config.num_hidden_layers == 4


def test_config_lists_and_prints_the_shipped_configs(capsys):
    assert main(["config", "--list"]) == 0
    names = capsys.readouterr().out.split()
    assert "zero3.json" in names and "accelerate_ddp_cpu.yaml" in names and "demo.json" in names
    assert main(["config", "zero3.json"]) == 0
    assert '"stage": 3' in capsys.readouterr().out
    assert main(["config", "nope.json"]) == 2
    assert capsys.readouterr().err.startswith("gradpruner: no shipped config named 'nope.json'")
    assert main(["config"]) == 0 and "| key | type | default | meaning |" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["zero3.json", "demo.json"])
def test_the_repository_configs_are_the_package_ones(name):
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    assert (root / "configs" / name).read_text() == (root / "gradpruner_ds" / "configs" / name).read_text()
