"""No field of a saved GradPruner state is trusted: a plan without its digest, edited counters, the statistics
of another model, a crafted file -- each a ``gradpruner:`` error naming the file and the field, raised before
anything is restored."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.tiny import batches, tiny_llama

from gradpruner_ds.checkpoint import load_pruner_state, save_pruner_state
from gradpruner_ds.config import GradPrunerConfig
from gradpruner_ds.errors import GradPrunerError
from gradpruner_ds.pruner import GradPruner

BLOCK = {"window_steps": 3, "num_drop": 1, "progress_bar": False}


def _saved(tmp_path, steps: int = 1, **model_kw):
    model = tiny_llama(4, **model_kw)
    pruner = GradPruner(model, GradPrunerConfig.from_dict(BLOCK))
    for b in batches(steps):
        model(**b).loss.backward()
        pruner.observe()
        model.zero_grad()
        pruner.maybe_prune()
    save_pruner_state(pruner, tmp_path)
    return tmp_path / "state.json"


def _load(tmp_path, **model_kw):
    pruner = GradPruner(tiny_llama(4, **model_kw), GradPrunerConfig.from_dict(BLOCK))
    return load_pruner_state(pruner, tmp_path)


def _edit(path, **fields):
    state = json.loads(path.read_text())
    for k, v in fields.items():
        if v is ...:
            state.pop(k)
        else:
            state[k] = v
    path.write_text(json.dumps(state))


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"steps_seen": 7}, "'steps_seen' must be an integer in \\[0, 3\\]"),
        ({"observed_steps": 2}, "'observed_steps' must be an integer in \\[0, 1\\]"),
        ({"skipped_steps": -1}, "'skipped_steps' must be an integer in \\[0, 1\\]"),
        ({"steps_seen": "1"}, "'steps_seen' must be an integer"),
        ({"world_size": 0}, "'world_size' must be an integer >= 1"),
        ({"num_layers": True}, "'num_layers' must be an integer >= 1"),
        ({"config_digest": "abc"}, "'config_digest' must be a sha256 hex digest"),
        ({"stages": "x"}, "'stages' must be a list"),
    ],
)
def test_edited_counters_are_refused_naming_the_file_and_the_field(tmp_path, fields, match):
    path = _saved(tmp_path)
    _edit(path, **fields)
    with pytest.raises(GradPrunerError, match=match) as exc:
        _load(tmp_path)
    assert str(path) in str(exc.value)


def test_a_plan_without_its_digest_is_refused(tmp_path):
    path = _saved(tmp_path, steps=3)  # after the prune: the plan is saved
    state = json.loads(path.read_text())
    assert state["plan"] is not None
    state["plan"].pop("digest")
    state["plan"]["dropped"] = [0]
    path.write_text(json.dumps(state))
    with pytest.raises(GradPrunerError, match="'plan' must be a plan with its digest"):
        _load(tmp_path)


def test_the_statistics_of_a_model_of_another_width_are_refused(tmp_path):
    """The default criterion's table has one column per layer: a model of the same depth and another width
    would load it silently and plan from the other model's statistics."""
    _saved(tmp_path)
    with pytest.raises(GradPrunerError, match="saved for another model"):
        _load(tmp_path, hidden_size=48, intermediate_size=96)


def test_crafted_files_are_gradpruner_errors(tmp_path):
    path = _saved(tmp_path)
    path.write_text(json.dumps([1, 2, 3]))
    with pytest.raises(GradPrunerError):
        _load(tmp_path)
    _saved(tmp_path)
    _edit(path, config_digest=...)
    with pytest.raises(GradPrunerError, match="'config_digest'"):
        _load(tmp_path)
    _saved(tmp_path)
    stats = tmp_path / "stats_rank0.safetensors"
    from gradpruner_ds.io import read_tensors, write_tensors

    saved = read_tensors(stats)
    saved["hidden_states"]["table"] = torch.zeros(2, 2, dtype=torch.float64)  # a table of another shape
    write_tensors(stats, saved, json.loads(path.read_text())["save_id"])
    with pytest.raises(GradPrunerError, match="'statistics' must be the statistics of this model"):
        _load(tmp_path)
