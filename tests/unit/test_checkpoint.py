"""Engine-neutral checkpoints (``gradpruner_ds.save_checkpoint`` / ``load_checkpoint``) in a plain PyTorch loop:
an exact resume before, inside and after the prune; a save is complete or invisible whatever the tag (a save
killed while it rewrites a tag, a stale GradPruner file beside a newer save); ``latest`` never leads outside
the checkpoint folder."""

from __future__ import annotations

import json
import multiprocessing as mp
import os

import pytest
import torch
from helpers.tiny import batches, tiny_llama

from gradpruner_ds.checkpoint import complete, load_checkpoint, resolve_tag, save_checkpoint
from gradpruner_ds.config import GradPrunerConfig
from gradpruner_ds.errors import GradPrunerError
from gradpruner_ds.pruner import GradPruner

STEPS = 8
BLOCK = {"window_steps": 2, "num_drop": 2, "progress_bar": False, "repair": {"steps": 2}}


def _setup():
    model = tiny_llama(6)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9**s)
    return model, opt, sched, GradPruner(model, GradPrunerConfig.from_dict(BLOCK), total_steps=STEPS)


def _steps(model, opt, sched, pruner, data):
    losses = []
    for b in data:
        out = model(**b)
        out.loss.backward()
        pruner.observe()
        opt.step()
        sched.step()
        opt.zero_grad()
        opt, sched = pruner.maybe_prune(opt, sched)
        losses.append(float(out.loss.detach()))
    return losses, opt, sched


@pytest.mark.parametrize("stop", [1, 3, 5])  # inside the window, inside the repair phase, after the cut
def test_a_plain_loop_resumes_exactly_from_its_checkpoint(tmp_path, stop):
    data = batches(STEPS, seq=10)
    model, opt, sched, pruner = _setup()
    straight, _, _ = _steps(model, opt, sched, pruner, data)

    model, opt, sched, pruner = _setup()
    first, opt, sched = _steps(model, opt, sched, pruner, data[:stop])
    tag = save_checkpoint(opt, pruner, tmp_path, client_state={"epoch": 3}, lr_scheduler=sched)
    assert tag == f"step{stop}" and (tmp_path / "latest").read_text() == tag and complete(tmp_path / tag)

    model, opt, sched, pruner = _setup()  # a new process: the dense model, a fresh optimizer
    opt, sched, client = load_checkpoint(opt, pruner, tmp_path, lr_scheduler=sched)
    assert client == {"epoch": 3}
    rest, _, _ = _steps(model, opt, sched, pruner, data[stop:])
    assert first + rest == pytest.approx(straight, abs=1e-6)


def _killed_resave(folder: str) -> None:
    """Saves under one fixed tag every step; dies (SIGKILL-like os._exit) inside the engine's part of the second
    save, after the tag's old files were partly replaced."""
    from gradpruner_ds.backends.plain import Backend

    orig = Backend.save_engine_state
    count = {"n": 0}

    def dying(self, *a, **kw):
        count["n"] += 1
        if count["n"] == 2:
            os._exit(9)
        return orig(self, *a, **kw)

    Backend.save_engine_state = dying
    model, opt, sched, pruner = _setup()
    for b in batches(3, seq=10):
        _steps(model, opt, sched, pruner, [b])
        save_checkpoint(opt, pruner, folder, tag="fixed", lr_scheduler=sched)


def test_a_save_killed_while_rewriting_its_tag_is_never_resumed(tmp_path):
    proc = mp.get_context("fork").Process(target=_killed_resave, args=(str(tmp_path),))
    proc.start()
    proc.join(120)
    assert proc.exitcode == 9
    assert (tmp_path / "latest").read_text() == "fixed"  # the first save committed ...
    assert not complete(tmp_path / "fixed")  # ... the second removed its marker before writing anything
    with pytest.raises(GradPrunerError, match="must be complete"):
        resolve_tag(tmp_path, None)


def test_a_stale_gradpruner_file_of_an_earlier_save_is_never_read(tmp_path):
    data = batches(STEPS, seq=10)
    model, opt, sched, pruner = _setup()
    _, opt, sched = _steps(model, opt, sched, pruner, data[:1])
    save_checkpoint(opt, pruner, tmp_path, tag="t", lr_scheduler=sched)  # inside the window: a stats file
    stale = (tmp_path / "t" / "gradpruner" / "stats_rank0.safetensors").read_bytes()
    _, opt, sched = _steps(model, opt, sched, pruner, data[1:6])
    save_checkpoint(opt, pruner, tmp_path, tag="t", lr_scheduler=sched)  # after the cut: no stats file
    assert not (tmp_path / "t" / "gradpruner" / "stats_rank0.safetensors").exists()
    # the stale file put back by hand (as an older save would have left it): the marker does not know it
    (tmp_path / "t" / "gradpruner" / "stats_rank0.safetensors").write_bytes(stale)
    assert not complete(tmp_path / "t")
    # and a state.json of another save beside this save's marker is refused too
    (tmp_path / "t" / "gradpruner" / "stats_rank0.safetensors").unlink()
    assert complete(tmp_path / "t")
    state = json.loads((tmp_path / "t" / "gradpruner" / "state.json").read_text())
    state["save_id"] = "0" * 16
    (tmp_path / "t" / "gradpruner" / "state.json").write_text(json.dumps(state))
    assert not complete(tmp_path / "t")


@pytest.mark.parametrize("latest", ["../elsewhere", "/etc", "a/b", ".."])
def test_latest_never_leads_outside_the_checkpoint_folder(tmp_path, latest):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "latest").write_text(latest)
    with pytest.raises(GradPrunerError, match="directly inside the checkpoint folder"):
        resolve_tag(tmp_path / "ck", None)
