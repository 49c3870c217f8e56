"""The report folder: checked before step 0, never the reason a pruned run dies, no stale files."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from helpers.tiny import batches, tiny_llama

from gradpruner_ds.config import GradPrunerConfig
from gradpruner_ds.errors import GradPrunerError
from gradpruner_ds.pruner import GradPruner


def _cfg(out, **kw) -> GradPrunerConfig:
    return GradPrunerConfig.from_dict(
        {"window_steps": 2, "num_drop": 1, "output_dir": str(out), "progress_bar": False, **kw}
    )


def _run(model, pruner, steps: int = 3):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for b in batches(steps, seed=1):
        model(**b).loss.backward()
        pruner.observe()
        opt.step()
        opt.zero_grad()
        opt, _ = pruner.maybe_prune(opt)
    return opt


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_report_folder_is_an_error_before_step_0(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    with pytest.raises(GradPrunerError, match="must be writable"):
        GradPruner(tiny_llama(4), _cfg(ro / "report"))


def test_a_report_path_that_is_a_file_is_an_error_before_step_0(tmp_path):
    (tmp_path / "taken").write_text("a file, not a folder")
    with pytest.raises(GradPrunerError, match="report folder .* must be writable"):
        GradPruner(tiny_llama(4), _cfg(tmp_path / "taken"))


def test_a_report_that_cannot_be_written_does_not_stop_training(tmp_path):
    model = tiny_llama(4)
    pruner = GradPruner(model, _cfg(tmp_path / "out"))
    shutil.rmtree(tmp_path / "out")
    (tmp_path / "out").write_text("the folder was replaced by a file after the start")
    _run(model, pruner, steps=4)  # prunes at step 2 and trains on
    assert pruner.plan is not None and model.config.num_hidden_layers == 3


def test_a_rerun_leaves_no_stale_plot_beside_its_report(tmp_path):
    model = tiny_llama(4)
    _run(model, GradPruner(model, _cfg(tmp_path, plot=True)))
    assert (tmp_path / "gradpruner_scores.png").exists()
    model = tiny_llama(4)
    _run(model, GradPruner(model, _cfg(tmp_path, plot=False, num_drop=2)))
    assert not (tmp_path / "gradpruner_scores.png").exists()
    assert len(json.loads((tmp_path / "gradpruner_report.json").read_text())["plan"]["dropped"]) == 2


def test_observe_only_writes_the_plan_and_prunes_nothing(tmp_path):
    model = tiny_llama(4)
    pruner = GradPruner(model, _cfg(tmp_path, observe_only=True, num_drop=2, plot=False))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = [id(p) for p in model.parameters()]
    assert _run(model, pruner, steps=4) is not None
    assert pruner.plan is not None and len(pruner.plan.dropped) == 2 and not pruner.ready
    assert model.config.num_hidden_layers == 4 and [id(p) for p in model.parameters()] == before
    report = json.loads((tmp_path / "gradpruner_report.json").read_text())
    assert report["observe_only"] is True and report["params_after"] < report["params_before"]
    assert {row["status"] for row in report["layers"]} == {"kept", "would be dropped"}
    assert pruner.statistics == {}  # hooks removed, statistics freed
    del opt


def test_the_report_gains_the_measured_step_times(tmp_path):
    model = tiny_llama(6)
    pruner = GradPruner(model, _cfg(tmp_path, num_drop=3, plot=False))
    _run(model, pruner, steps=2 + 6)
    times = json.loads((tmp_path / "gradpruner_report.json").read_text())["step_time_s"]
    assert times["steps"] == [1, 5] and times["before_median"] > 0 and times["after_median"] > 0
    assert times["after_over_before"] == pytest.approx(times["after_median"] / times["before_median"])
