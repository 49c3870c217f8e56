"""gradpruner-ds eval (lm-evaluation-harness) against the project's own scoring on the same items: a tiny
random Llama over the SmolLM2 tokenizer, pruned and saved like a run's result, scored on the same test
items of the real task files (local lm_eval task YAMLs, no download): the same accuracy."""

from __future__ import annotations

import argparse

import pytest

pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    import gradpruner_ds
    from gradpruner_ds.surgery import remove_layers
    from launch.train import load_tokenizer, tiny_model

    out = tmp_path_factory.mktemp("lm_eval_model")
    tok = load_tokenizer()
    model = tiny_model(len(tok), 6, seed=1)
    remove_layers(model, [4])
    gradpruner_ds.save_pretrained(model, out / "pruned", tok)
    return out / "pruned", tok


@pytest.mark.parametrize("task", ["intent_recognition", "piqa"])
def test_lm_eval_accuracy_equals_ours_on_the_same_items(tmp_path, saved, task):
    from transformers import AutoModelForCausalLM

    from gradpruner_ds.evaluate import evaluate
    from launch.lm_eval_tasks import TASKS, write_task
    from launch.tasks import evaluate_choices, load_task, split_task

    model_dir, tok = saved
    name = write_task(task, TASKS[task], tmp_path / "tasks", limit=40)
    theirs = evaluate(model_dir, [name], include_path=tmp_path / "tasks", batch_size=8)[name]["acc"]
    items = split_task(load_task(TASKS[task]), seed=0).test[:40]
    ours = evaluate_choices(AutoModelForCausalLM.from_pretrained(model_dir), tok, items, batch_size=8)
    assert theirs == pytest.approx(ours, abs=1e-9)


def test_eval_command_without_tasks_is_a_clear_error(saved):
    from gradpruner_ds.errors import GradPrunerError
    from gradpruner_ds.evaluate import run_cli

    args = argparse.Namespace(model=str(saved[0]), dense=None, tasks=",", include_path=None, limit=None,
                              batch_size=8, device="cpu", metric="acc", json=None)  # fmt: skip
    with pytest.raises(GradPrunerError, match="--tasks must name at least one"):
        run_cli(args)
