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


# ---- gradpruner-ds eval checks every argument before any work ----------------------------------------
@pytest.fixture(scope="module")
def unloadable(tmp_path_factory):
    """A folder that looks like a checkpoint (config.json, model.safetensors) but whose weights are garbage:
    any evaluation work would fail on it with a traceback, so a gradpruner: error proves the check came first."""
    from helpers.tiny import tiny_llama_config

    out = tmp_path_factory.mktemp("unloadable")
    tiny_llama_config(2).save_pretrained(out)
    (out / "model.safetensors").write_bytes(b"not a safetensors file")
    return out


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    from launch.lm_eval_tasks import TASKS, write_task

    out = tmp_path_factory.mktemp("gp_tasks")
    write_task("intent_recognition", TASKS["intent_recognition"], out, limit=40)
    return out


@pytest.mark.parametrize(
    ("extra", "phrase"),
    [
        (["--tasks", "pqia"], "--tasks must name lm_eval tasks, groups or tags"),
        (
            ["--tasks", "gp_intent_recognition", "--include-path", None],
            "(local task YAMLs need --include-path)",
        ),
        (["--include-path", "{tmp}/no-such-folder"], "--include-path must be a folder"),
        (
            ["--json", "{tmp}/no-such-folder/results.json"],
            "--json must be a file path in an existing, writable",
        ),
        (["--json", "{tmp}"], "--json must be a file path"),
        (["--dense", "{tmp}/no-such-dense"], "--dense must be a from_pretrained folder"),
        (["--model", "{tmp}"], "--model must be a from_pretrained folder"),
        (["--metric", "acc_nrom"], "--metric must be one the task computes (gp_intent_recognition: acc)"),
        (["--device", "gpu9"], "--device must be a torch device"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--limit", "0"], "--limit must be at least 1"),
    ],
)
def test_eval_checks_every_argument_before_any_work(tmp_path, capsys, unloadable, tasks_dir, extra, phrase):
    from gradpruner_ds.cli import main

    args = {"--model": str(unloadable), "--tasks": "gp_intent_recognition", "--include-path": str(tasks_dir)}
    for key, value in zip(extra[::2], extra[1::2], strict=True):
        args[key] = None if value is None else value.format(tmp=tmp_path)
    argv = ["eval"] + [x for k, v in args.items() if v is not None for x in (k, v)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("gradpruner: ") and phrase in err[-1], err[-3:]
    assert "Traceback" not in "\n".join(err)
    assert not any(tmp_path.rglob("*.json"))


def test_an_unknown_task_names_the_close_ones(capsys, unloadable):
    from gradpruner_ds.cli import main

    assert main(["eval", "--model", str(unloadable), "--tasks", "piqa,arc_easyy"]) == 2
    err = capsys.readouterr().err
    assert "(got 'arc_easyy')" in err and "did you mean ['arc_easy'" in err


def test_eval_prints_items_and_standard_errors(tmp_path, capsys, saved, tasks_dir):
    """Each accuracy with its standard error (sqrt(p (1 - p) / (n - 1)), lm_eval's formula for a mean) and the
    number of items; the same in --json."""
    import json
    import math

    from gradpruner_ds.cli import main

    out = tmp_path / "results.json"
    argv = ["eval", "--model", str(saved[0]), "--dense", str(saved[0]), "--tasks", "gp_intent_recognition",
            "--include-path", str(tasks_dir), "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    table = capsys.readouterr().out
    row = json.loads(out.read_text())["pruned"]["gp_intent_recognition"]
    assert row["n"] == 40
    assert row["acc_stderr"] == pytest.approx(math.sqrt(row["acc"] * (1 - row["acc"]) / 39))
    cell = f"{row['acc']:.4f} ± {row['acc_stderr']:.4f}"
    assert "| task | items | pruned acc | dense acc | pruned - dense |" in table
    assert f"| gp_intent_recognition | 40 | {cell} | {cell} | +0.0000 |" in table
