"""``--gradpruner`` / ``--gradpruner_config``: argparse behaviour and config resolution (gradpruner: errors)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from gradpruner_ds.args import add_argparse_args, read_block_file, resolve_config
from gradpruner_ds.config import GradPrunerConfig

ROOT = Path(__file__).resolve().parents[2]
BLOCK = {"window_steps": 4, "num_drop": 2}
OTHER = {"window_steps": 7, "prune_ratio": 0.25}


def parse(*argv: str) -> argparse.Namespace:
    return add_argparse_args(argparse.ArgumentParser()).parse_args(list(argv))


def write(tmp_path: Path, data: object, name: str = "block.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def assert_gp_error(exc: pytest.ExceptionInfo, *needles: str) -> None:
    msg = str(exc.value)
    assert msg.startswith("gradpruner:"), msg
    for needle in needles:
        assert needle in msg, (needle, msg)


# ---- argparse ------------------------------------------------------------------------------------
def test_defaults_and_flags():
    args = parse()
    assert args.gradpruner is False and args.gradpruner_config is None
    args = parse("--gradpruner", "--gradpruner_config", "x.json")
    assert args.gradpruner is True and args.gradpruner_config == "x.json"


def test_returns_parser_and_adds_a_named_group():
    parser = argparse.ArgumentParser()
    assert add_argparse_args(parser) is parser
    titles = [g.title for g in parser._action_groups]
    assert "GradPruner" in titles
    assert "--gradpruner_config" in parser.format_help()


def test_composes_with_deepspeed_arguments():
    deepspeed = pytest.importorskip("deepspeed")
    parser = deepspeed.add_config_arguments(argparse.ArgumentParser())
    add_argparse_args(parser)
    args = parser.parse_args(["--deepspeed", "--deepspeed_config", "ds.json", "--gradpruner"])
    assert args.deepspeed and args.deepspeed_config == "ds.json" and args.gradpruner


def test_gradpruner_takes_no_value():
    with pytest.raises(SystemExit):
        parse("--gradpruner", "yes")


# ---- resolution ----------------------------------------------------------------------------------
def test_off_returns_none_with_or_without_a_block():
    assert resolve_config(parse(), None) is None
    assert resolve_config(parse(), {"train_batch_size": 8}) is None
    assert resolve_config(parse(), {"gradpruner": BLOCK}) is None


def test_off_still_rejects_a_misspelled_block():
    with pytest.raises(ValueError) as exc:
        resolve_config(parse(), {"grad_pruner": BLOCK})
    assert_gp_error(exc, "misspelling", "grad_pruner")


def test_off_still_validates_a_present_block():
    with pytest.raises(ValueError) as exc:
        resolve_config(parse(), {"gradpruner": {**BLOCK, "keep_frac": 0.3}})
    assert_gp_error(exc, "unknown key 'keep_frac'")


def test_block_file_without_the_switch_is_an_error(tmp_path):
    with pytest.raises(ValueError) as exc:
        resolve_config(parse("--gradpruner_config", write(tmp_path, BLOCK)), None)
    assert_gp_error(exc, "--gradpruner is off", "add --gradpruner")


def test_on_reads_the_deepspeed_block():
    cfg = resolve_config(parse("--gradpruner"), {"train_batch_size": 8, "gradpruner": BLOCK})
    assert isinstance(cfg, GradPrunerConfig)
    assert cfg.window_steps == 4 and cfg.num_drop == 2


@pytest.mark.parametrize("ds_config", [None, {}, {"train_batch_size": 8}])
def test_on_without_any_block_is_the_load_config_error(ds_config):
    with pytest.raises(ValueError) as exc:
        resolve_config(parse("--gradpruner"), ds_config)
    assert_gp_error(exc, "--gradpruner needs a 'gradpruner' block")


def test_on_with_a_misspelled_block(tmp_path):
    with pytest.raises(ValueError) as exc:
        resolve_config(parse("--gradpruner"), {"gradPruner": BLOCK})
    assert_gp_error(exc, "misspelling", "gradPruner")
    # a block file does not hide the typo in the DeepSpeed config either
    with pytest.raises(ValueError) as exc:
        resolve_config(parse("--gradpruner", "--gradpruner_config", write(tmp_path, BLOCK)), {"gradprunr": BLOCK})
    assert_gp_error(exc, "misspelling", "gradprunr")


def test_block_file_overrides_the_deepspeed_block(tmp_path):
    args = parse("--gradpruner", "--gradpruner_config", write(tmp_path, OTHER))
    cfg = resolve_config(args, {"gradpruner": BLOCK})
    assert cfg is not None and cfg.window_steps == 7 and cfg.prune_ratio == 0.25 and cfg.num_drop is None
    assert resolve_config(args, None) == cfg  # no DeepSpeed config at all (plain PyTorch)


def test_block_file_may_wrap_the_block(tmp_path):
    args = parse("--gradpruner", "--gradpruner_config", write(tmp_path, {"gradpruner": OTHER}))
    cfg = resolve_config(args, None)
    assert cfg is not None and cfg.window_steps == 7


def test_invalid_block_in_the_file(tmp_path):
    args = parse("--gradpruner", "--gradpruner_config", write(tmp_path, {**BLOCK, "window_steps": 0}))
    with pytest.raises(ValueError) as exc:
        resolve_config(args, None)
    assert_gp_error(exc, "'window_steps'", "Fix:")


def test_invalid_block_in_the_deepspeed_config():
    with pytest.raises(ValueError) as exc:
        resolve_config(parse("--gradpruner"), {"gradpruner": {"window_steps": 3}})
    assert_gp_error(exc, "set exactly one of num_drop or prune_ratio")


@pytest.mark.parametrize(
    "content,needle",
    [
        (None, "must exist"),
        ("{not json", "must be valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
    ],
)
def test_bad_block_files(tmp_path, content, needle):
    path = tmp_path / "block.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError) as exc:
        read_block_file(path)
    assert_gp_error(exc, needle)
    with pytest.raises(ValueError) as exc:
        resolve_config(parse("--gradpruner", "--gradpruner_config", str(path)), None)
    assert_gp_error(exc, needle)


@pytest.mark.parametrize("name", ["demo.json", "zero1.json", "zero2.json", "zero3.json", "zero2_bf16.json", "zero3_bf16.json"])
def test_shipped_configs_resolve(name):
    path = ROOT / "configs" / name
    data = json.loads(path.read_text())
    if name == "demo.json":  # just the block
        cfg = resolve_config(parse("--gradpruner", "--gradpruner_config", str(path)), None)
    else:
        assert "optimizer" not in data  # a client torch AdamW: no 70 s JIT build
        assert "gradient_clipping" in data
        cfg = resolve_config(parse("--gradpruner"), data)
    assert cfg is not None and cfg.enabled
    assert cfg.resolve_budget(30)[0] + cfg.resolve_budget(30)[1] == 9  # 30% of SmolLM2's 30 layers


@pytest.mark.parametrize(
    ("argv", "phrase"),
    [
        (["--max_steps", "0"], "--max_steps must be at least 1"),
        (["--micro_batch_size", "0"], "--micro_batch_size must be at least 1"),
        (["--lr", "0"], "--lr must be a positive number"),
        (["--gradient_clipping", "-1"], "--gradient_clipping must be a non-negative number"),
        (["--eval_size", "-2"], "--eval_size must be at least -1"),
        (["--task", "no/such/task.json"], "--task must be a BIG-bench .json file"),
        (["--deepspeed", "--deepspeed_config", "no/such/ds.json"], "the DeepSpeed config file must exist"),
    ],
)
def test_train_py_arguments_are_checked_before_any_work(tmp_path, argv, phrase):
    """launch/train.py: a bad argument is one gradpruner: line and exit code 2, nothing loaded or written."""
    import subprocess
    import sys

    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "train.py"), *argv, "--output_dir", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("gradpruner: ") and phrase in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


@pytest.mark.parametrize(
    ("argv", "phrase"),
    [
        (["--model-config", "llama-3.1-8b", "--world-size", "0"], "--world-size must be at least 1"),
        (["--model-config", "no-such.json", "--world-size", "8"], "--model-config must be one of"),
        (["--model-config", "llama-3.1-8b", "--world-size", "8", "--gradpruner", "{oops"], "must be valid JSON"),
        (["--model-config", "llama-3.1-8b", "--world-size", "8", "--gradpruner",
          '{"window_steps": 4, "num_drop": 2, "num_drop": 3}'], "'num_drop' twice"),
        (["--model-config", "llama-3.1-8b", "--world-size", "8", "--lora-rank", "0"], "--lora-rank must be at least 1"),
        (["--model-config", "llama-3.1-8b", "--world-size", "8", "--total-steps", "1"], "--total-steps must be at least 2"),
        (["--model-config", "llama-3.1-8b", "--world-size", "8", "--gradpruner", '{"window_fraction": 0.01, "num_drop": 2}'],
         "window_fraction needs the run's total"),
    ],
)  # fmt: skip
def test_cli_plan_arguments_are_checked(capsys, argv, phrase):
    from gradpruner_ds.cli import main

    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gradpruner: ") and phrase in err


SMALL = {"model_type": "llama", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip


@pytest.mark.parametrize(
    ("change", "phrase"),
    [
        ({"hidden_size": -64}, "'hidden_size' must be a positive integer (got -64)"),
        ({"num_hidden_layers": "6"}, "'num_hidden_layers' must be a positive integer (got '6')"),
        ({"vocab_size": 1.5}, "'vocab_size' must be a positive integer"),
        ({"num_attention_heads": True}, "'num_attention_heads' must be a positive integer"),
        ({"num_hidden_layers": None}, "'num_hidden_layers' must be a positive integer"),
        ({"num_key_value_heads": 3}, "num_attention_heads must be a multiple of num_key_value_heads"),
        ({"hidden_size": 66}, "hidden_size must be a multiple of num_attention_heads"),
        ({"rms_norm_eps": -1.0}, "'rms_norm_eps' must be a positive number"),
        ({"model_type": "no-such-model"}, "model_type must be one transformers knows"),
        ({"model_type": 5}, "must be an HF config.json object with a model_type"),
        ({"dtype": "int3"}, "torch_dtype must be one of"),
        ({"model_type": "gpt2", "vocab_size": 50304}, "register_arch"),
    ],
)
def test_cli_plan_checks_the_model_config(tmp_path, capsys, change, phrase):
    """A bad config.json is one gradpruner: line and exit code 2 (it was a raw traceback)."""
    from gradpruner_ds.cli import main

    path = tmp_path / "config.json"
    path.write_text(json.dumps({**SMALL, **change}))
    assert main(["plan", "--model-config", str(path), "--world-size", "2",
                 "--gradpruner", '{"window_steps": 4, "num_drop": 2}']) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.startswith("gradpruner: ") and phrase in err and "Traceback" not in err, err


@pytest.mark.parametrize(
    ("name", "billions"),
    [("llama-3.1-70b", 70.55), ("llama3.1-70b", 70.55), ("llama-3.1-8b", 8.03), ("llama3.1-8b", 8.03),
     ("mistral-7b", 7.25), ("qwen2.5-7b", 7.62), ("qwen3-8b", 8.19)],
)  # fmt: skip
def test_cli_plan_knows_every_model_family_of_configs(capsys, name, billions):
    """Each family of configs/ by name (and by its config file's spelling), at its published size; the
    DeepSpeed config of configs/ works as --gradpruner (its block), window_fraction with --total-steps."""
    from gradpruner_ds.cli import main

    ds = {"llama": "llama3.1-8b_zero2_1node.json", "mistral": "mistral-7b_zero2_1node.json",
          "qwen2.5": "qwen2.5-7b_zero2_1node.json", "qwen3": "qwen3-8b_zero3_2nodes.json"}  # fmt: skip
    config = next(v for k, v in ds.items() if name.startswith(k))
    argv = ["plan", "--model-config", name, "--world-size", "16", "--json",
            "--gradpruner", str(ROOT / "configs" / config), "--total-steps", "1000"]  # fmt: skip
    assert main(argv) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["params_before"] / 1e9 == pytest.approx(billions, abs=0.01)
    assert d["ranking"].startswith("an ASSUMED ranking")


def test_cli_plan_reads_a_from_pretrained_folder_and_labels_the_assumed_ranking(tmp_path, capsys):
    from gradpruner_ds.cli import main

    (tmp_path / "config.json").write_text(json.dumps(SMALL))
    assert main(["plan", "--model-config", str(tmp_path), "--world-size", "2",
                 "--gradpruner", '{"window_steps": 4, "num_drop": 2}']) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "layers chosen by: an ASSUMED ranking, importance falling with depth (a dry run has no scores" in out
    assert main(["plan", "--model-config", str(tmp_path), "--world-size", "2",
                 "--gradpruner", '{"window_steps": 4, "layers_to_remove": [1, 2]}']) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "remove 2 layers [1, 2]" in out and "layers chosen by: given: layers_to_remove (exact)" in out


def test_cli_plan_counts_the_recovery_teacher(tmp_path, capsys):
    """The teacher is a frozen copy of the pre-prune weights in their dtype: each rank's shard under ZeRO-3 /
    FSDP2 (what the dry run models), whole in one process or ZeRO-1/2 (``tests/dist/test_scale.py`` checks
    both against real runs)."""
    from gradpruner_ds.cli import main
    from gradpruner_ds.scale import KNOWN, meta_model

    block = '{"window_steps": 40, "prune_ratio": 0.4, "recovery": {"distill_steps": 32}}'
    assert main(["plan", "--model-config", "llama-3.1-8b", "--world-size", "64", "--gradpruner", block, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    params = [p.numel() for p in meta_model(KNOWN["llama-3.1-8b"]).parameters()]
    assert d["teacher_bytes_whole"] == 2 * sum(params) and d["weight_dtype"] == "bfloat16"
    assert d["teacher_bytes_per_rank"] == 2 * sum(-(-n // 64) for n in params) and d["teacher_steps"] == 32
    assert main(["plan", "--model-config", "llama-3.1-8b", "--world-size", "64", "--gradpruner", block]) == 0
    assert "recovery teacher (32 steps after the prune, bfloat16 weights): 0.234 GiB per rank" in capsys.readouterr().out


def _train_py(tmp_path, *argv):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, str(ROOT / "launch" / "train.py"), "--tiny", "--tiny_layers", "4", "--max_steps", "6",
         "--batch_size", "4", "--eval_size", "0", "--threads", "1", *argv],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_train_py_refuses_an_empty_output_dir(tmp_path):
    proc = _train_py(tmp_path, "--output_dir", "")
    assert proc.returncode == 2 and "gradpruner: --output_dir must name a folder" in proc.stderr


def test_a_diverged_run_saves_nothing_as_final_and_exits_non_zero(tmp_path):
    """--lr 1e30: the loss and the weights go NaN. Without --save_non_finite: one gradpruner: line, exit 2,
    no final/ and no summary.json. With it: written and marked, and the parameter count is the pruned model's
    (it was 189% of dense: the tied embedding was written twice and NaN != NaN kept transformers from tying it
    again on load)."""
    import json

    block = write(tmp_path, {"window_steps": 2, "num_drop": 1, "progress_bar": False, "plot": False})
    out = tmp_path / "out"
    proc = _train_py(tmp_path, "--lr", "1e30", "--output_dir", str(out), "--gradpruner", "--gradpruner_config", block)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("gradpruner: a run whose final loss or weights are not finite is not saved"), last
    assert "final loss nan" in last and "--save_non_finite" in last
    assert not (out / "final").exists() and not (out / "summary.json").exists()

    proc = _train_py(tmp_path, "--lr", "1e30", "--output_dir", str(out), "--gradpruner", "--gradpruner_config", block,
                     "--save_non_finite")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["non_finite"] is True and "did not end finite" in proc.stdout
    assert summary["pruned_params"] < summary["dense_params"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.config.num_hidden_layers == 3


def test_a_final_folder_that_is_not_ours_is_refused_before_training(tmp_path):
    """The export's checks run before the model is loaded, not after a long run (the base model in final/)."""
    from helpers.tiny import tiny_llama

    out = tmp_path / "out"
    tiny_llama(2).save_pretrained(out / "final")
    proc = _train_py(tmp_path, "--output_dir", str(out))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("gradpruner: the folder holds a model that gradpruner")
    assert "model tiny" not in proc.stdout and sorted(p.name for p in out.iterdir()) == ["final"]
