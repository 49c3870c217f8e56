"""``gradpruner_ds.save_pretrained``: the pruned model a run leaves behind loads with ``from_pretrained`` and
gives the trained model's logits, also when the run trained peft LoRA adapters (merged on export)."""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import stat
import time
from pathlib import Path

import pytest
import torch
from helpers.tiny import batches, tiny_llama
from transformers import AutoModelForCausalLM

import gradpruner_ds
from gradpruner_ds.config import GradPrunerConfig
from gradpruner_ds.export import MARKER
from gradpruner_ds.pruner import GradPruner


def _train_and_prune(model, steps: int = 4):
    cfg = GradPrunerConfig.from_dict({"window_steps": 2, "num_drop": 2, "progress_bar": False})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    pruner = GradPruner(model, cfg, total_steps=steps)
    for b in batches(steps, seed=3):
        model(**b).loss.backward()
        pruner.observe()
        opt.step()
        opt.zero_grad()
        opt, _ = pruner.maybe_prune(opt)
    assert pruner.plan is not None
    return pruner.plan


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_saved_pruned_model_loads_to_the_same_logits(tmp_path):
    model = tiny_llama(6)
    model.train()
    _train_and_prune(model)
    out = gradpruner_ds.save_pretrained(model, tmp_path / "final")
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ids = batches(1, seed=9)[0]["input_ids"]
    assert loaded.config.num_hidden_layers == 4
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("targets", [None, "all-linear"])
def test_peft_lora_run_saves_the_complete_pruned_model(tmp_path, targets):
    """peft's default LoraConfig (q_proj / v_proj) and all-linear: the folder is the pruned base with the
    trained adapters merged in, not the adapters alone and not the unpruned base."""
    from peft import LoraConfig, get_peft_model

    kw = {} if targets is None else {"target_modules": targets}
    model = get_peft_model(tiny_llama(6), LoraConfig(r=4, task_type="CAUSAL_LM", **kw))
    model.train()
    plan = _train_and_prune(model)
    ids = batches(1, seed=9)[0]["input_ids"]
    expect = _logits(model, ids)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    gradpruner_ds.save_pretrained(model, tmp_path / "final")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # training model untouched
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert loaded.config.num_hidden_layers == 6 - len(plan.removed)
    assert not any("lora" in n for n, _ in loaded.named_parameters())
    torch.testing.assert_close(_logits(loaded, ids), expect, rtol=1e-5, atol=1e-5)


# ---- exports never destroy ---------------------------------------------------------------------------
# A previous export, the user's own entries beside it, and the new export: whatever happens, the folder loads
# as the previous export or the new one, and the user's entries are never lost.

USER = {"notes.txt": "my notes", "checkpoints/step-10/state.bin": "x" * 100, "gradpruner_report.json": "{}"}


def _put_user_files(folder: Path) -> None:
    for rel, text in USER.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)


def _assert_user_files(folder: Path) -> None:
    for rel, text in USER.items():
        assert (folder / rel).read_text() == text, rel


def _ids():
    return batches(1, seed=9)[0]["input_ids"]


def _which(folder: Path, models: dict[str, torch.Tensor]) -> str | None:
    """Which of ``models`` (name -> expected logits) ``from_pretrained(folder)`` gives; None: no config.json."""
    if not (folder / "config.json").exists():
        return None
    got = _logits(AutoModelForCausalLM.from_pretrained(folder), _ids())
    for name, expect in models.items():
        if got.shape == expect.shape and torch.allclose(got, expect, rtol=1e-5, atol=1e-5):
            return name
    raise AssertionError(f"{folder} loads as neither of {sorted(models)}")


def test_user_files_are_kept_and_only_our_own_files_are_replaced(tmp_path):
    old, new = tiny_llama(6), tiny_llama(4, seed=1)
    out = tmp_path / "final"
    out.mkdir()
    _put_user_files(out)
    gradpruner_ds.save_pretrained(old, out, max_shard_size="50KB")  # several shards + index
    assert (out / "model.safetensors.index.json").exists()
    _assert_user_files(out)
    gradpruner_ds.save_pretrained(new, out)  # one model.safetensors: the old shards and index are gone
    _assert_user_files(out)
    ours = json.loads((out / MARKER).read_text())["files"]
    assert sorted(os.listdir(out)) == sorted(
        [*ours, MARKER, "notes.txt", "checkpoints", "gradpruner_report.json"]
    )
    assert "model.safetensors" in ours and not any(f.startswith("model-") for f in ours)
    assert os.listdir(tmp_path) == ["final"]  # no temporary folder left
    assert _which(out, {"new": _logits(new, _ids())}) == "new"


def test_the_report_and_the_export_share_one_folder(tmp_path):
    """The README's pattern: the block's output_dir and the export's folder are the same."""
    model = tiny_llama(6)
    model.train()
    cfg = GradPrunerConfig.from_dict({"window_steps": 2, "num_drop": 2, "progress_bar": False, "plot": False,
                                      "output_dir": str(tmp_path / "out")})  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pruner = GradPruner(model, cfg, total_steps=4)
    for b in batches(4, seed=3):
        model(**b).loss.backward()
        pruner.observe()
        opt.step()
        opt.zero_grad()
        opt, _ = pruner.maybe_prune(opt)
    report = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert "gradpruner_report.json" in report
    for _ in range(2):  # a first export and a rerun
        gradpruner_ds.save_pretrained(model, tmp_path / "out")
        assert {n: (tmp_path / "out" / n).read_bytes() for n in report} == report
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.num_hidden_layers == 4


def _tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(63)} | {"[UNK]": 63}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="[UNK]")), unk_token="[UNK]"
    )


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    ("case", "phrase"),
    [
        ("foreign-model", "holds a model that gradpruner did not export"),
        ("foreign-tokenizer", "files of the same names that gradpruner did not export"),
        ("regular-file", "the path is a file"),
        ("file-in-path", "a part of the path is a file"),
        ("corrupt-marker", f"{MARKER} must list the files"),
    ],
)
def test_a_target_that_is_not_ours_to_clear_is_refused_before_any_work(tmp_path, case, phrase):
    """Nothing is written, moved or removed: the folder's files are byte for byte what they were and no
    temporary folder is left."""
    model = tiny_llama(4)
    target = tmp_path / "target"
    if case == "foreign-model":  # someone's own save_pretrained folder (e.g. the base model)
        model.save_pretrained(target)
        (target / "notes.txt").write_text("mine")
    elif case == "foreign-tokenizer":  # no model, but a tokenizer.json the export would overwrite
        target.mkdir()
        (target / "tokenizer.json").write_text("their tokenizer")
    elif case == "regular-file":
        target.write_text("a file")
    elif case == "file-in-path":
        target.write_text("a file")
        target = target / "final"
    else:  # an edited marker: no longer a record of what is ours
        gradpruner_ds.save_pretrained(model, target)
        (target / MARKER).write_text("{not json")
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError) as exc:
        gradpruner_ds.save_pretrained(model, target, _tokenizer())
    msg = str(exc.value)
    assert msg.startswith("gradpruner:") and phrase in msg and "Fix:" in msg, msg
    assert _snapshot(tmp_path) == before
    assert not [p for p in tmp_path.iterdir() if ".gradpruner-" in p.name]


def _old_export(model, folder: Path) -> None:
    """The layout gradpruner_ds's export wrote before exports were marked (what users have on disk): one
    safetensors file per decoder layer and per other tensor (the tied head too), an index with total_size."""
    from safetensors.torch import save_file

    folder.mkdir()
    state = model.state_dict()
    groups: list[list[str]] = [["model.embed_tokens.weight"]]
    groups += [
        [k for k in state if k.startswith(f"model.layers.{i}.")] for i in range(len(model.model.layers))
    ]
    groups += [["model.norm.weight"], ["lm_head.weight"]]
    weight_map = {}
    for i, names in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(
            {k: state[k].contiguous().clone() for k in names}, str(folder / fname), metadata={"format": "pt"}
        )
        weight_map |= dict.fromkeys(names, fname)
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)


def test_an_export_written_before_exports_were_marked_is_replaced(tmp_path):
    """Recognised by its file set (one shard per layer), so a rerun into outputs/demo/final works; the user's
    files beside it are kept."""
    old, new = tiny_llama(6), tiny_llama(4, seed=1)
    out = tmp_path / "final"
    _old_export(old, out)
    _put_user_files(out)
    assert _which(out, {"old": _logits(old, _ids())}) == "old"
    gradpruner_ds.save_pretrained(new, out, _tokenizer())
    _assert_user_files(out)
    assert not any(p.name.startswith("model-") for p in out.iterdir())
    assert _which(out, {"new": _logits(new, _ids())}) == "new"


def test_a_folder_transformers_sharded_is_not_taken_for_an_old_export(tmp_path):
    model = tiny_llama(6)
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    before = _snapshot(tmp_path)
    with pytest.raises(
        ValueError, match="gradpruner: the folder holds a model that gradpruner did not export"
    ):
        gradpruner_ds.save_pretrained(model, tmp_path / "hf")
    assert _snapshot(tmp_path) == before


def test_a_tokenizer_is_written_beside_the_model(tmp_path):
    gradpruner_ds.save_pretrained(tiny_llama(4), tmp_path / "final", _tokenizer())
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "final").convert_tokens_to_ids("w5") == 5
    assert "tokenizer.json" in json.loads((tmp_path / "final" / MARKER).read_text())["files"]


@pytest.mark.parametrize("size", [None, "100KB", "20KB", 30000])
def test_shards_follow_transformers_save_pretrained(tmp_path, size):
    """The same files and the same weight map as ``PreTrainedModel.save_pretrained`` with the same
    ``max_shard_size`` (default: transformers' own default: one ``model.safetensors`` for a small model)."""
    model = tiny_llama(6)
    kw = {} if size is None else {"max_shard_size": size}
    gradpruner_ds.save_pretrained(model, tmp_path / "ours", **kw)
    model.save_pretrained(tmp_path / "hf", **kw)
    ours = sorted(os.listdir(tmp_path / "ours"))
    assert sorted(os.listdir(tmp_path / "hf")) == [f for f in ours if f != MARKER]
    if size is None:
        assert "model.safetensors" in ours and "model.safetensors.index.json" not in ours
    else:
        index = [
            json.loads((tmp_path / d / "model.safetensors.index.json").read_text()) for d in ("ours", "hf")
        ]
        assert index[0] == index[1]
        assert len({*index[0]["weight_map"].values()}) == {"100KB": 3, "20KB": 16, 30000: 9}[size]
    assert _which(tmp_path / "ours", {"model": _logits(model, _ids())}) == "model"


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_are_created_with_the_umask_like_any_file_write(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        gradpruner_ds.save_pretrained(tiny_llama(4), tmp_path / "final", _tokenizer(), max_shard_size="50KB")
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "final").iterdir()}
    assert set(modes.values()) == {mode}, modes
    assert stat.S_IMODE((tmp_path / "final").stat().st_mode) == 0o777 & ~umask


def test_non_finite_weights_are_refused_unless_allowed_and_ties_survive(tmp_path):
    """A diverged run's weights (inf/NaN) are not exported by default. Written anyway, the tied embedding is
    written once and loads tied (written twice, NaN != NaN made transformers untie it: the 189%-of-dense
    parameter count of a diverged launch/train.py run)."""
    model = tiny_llama(4)
    with torch.no_grad():
        model.model.embed_tokens.weight[3, 0] = float("nan")
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="gradpruner: the model's weights must be finite") as exc:
        gradpruner_ds.save_pretrained(model, tmp_path / "final")
    assert "model.embed_tokens.weight" in str(exc.value) and "allow_non_finite=True" in str(exc.value)
    assert os.listdir(tmp_path) == []
    gradpruner_ds.save_pretrained(model, tmp_path / "final", allow_non_finite=True)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())


# ---- kill points: a real SIGKILL of a real process at every file-system step of the export -------------

_STEPS = ("rename", "replace", "mkdir", "rmdir", "unlink", "remove", "fsync", "chmod")


def _export_in_a_child(model, out: Path, kill_at: int, **kw) -> int | None:
    """Fork; the child runs ``save_pretrained`` and SIGKILLs itself just before its ``kill_at``-th file-system
    step (every ``os`` call that changes or syncs the disk, every file opened for writing, the exchange).
    Returns how many steps a child that was not killed took; None when it was killed."""
    import signal

    from gradpruner_ds import export

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(read)
            count = [0]

            def step(fn):
                def inner(*a, **k):
                    count[0] += 1
                    if count[0] == kill_at:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return fn(*a, **k)

                return inner

            for name in _STEPS:
                setattr(os, name, step(getattr(os, name)))
            export._exchange = step(export._exchange)
            real_open = io.open

            def open_(file, mode="r", *a, **k):  # every file opened for writing (ours and transformers')
                return (step(real_open) if set(mode) & set("wax+") else real_open)(file, mode, *a, **k)

            io.open = builtins.open = open_
            gradpruner_ds.save_pretrained(model, out, **kw)
            os.write(write, str(count[0]).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    deadline = time.monotonic() + 120
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the export child hung (kill_at={kill_at})")
        time.sleep(0.01)
    with os.fdopen(read) as fh:
        steps = fh.read()
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return None
    assert os.WEXITSTATUS(status) == 0, f"the export child failed (kill_at={kill_at})"
    return int(steps)


@pytest.mark.parametrize("start", ["no-folder", "user-files", "previous-export"])
def test_an_export_killed_at_any_step_leaves_a_loadable_model_and_the_next_one_recovers(tmp_path, start):
    """For every file-system step of the export, a child process doing it is SIGKILLed just before that
    step. Then: the folder loads as the previous export or the new one (or nothing, where there was no
    previous export), no user file is lost (each is in the folder or in the interrupted export's temporary
    folder), and the next export puts every user file back, leaves no temporary folder and loads as the new
    model."""
    old, new = tiny_llama(6), tiny_llama(4, seed=1)
    expect = {"old": _logits(old, _ids()), "new": _logits(new, _ids())}
    template = tmp_path / "template"
    if start != "no-folder":
        template.mkdir()
        _put_user_files(template)
    if start == "previous-export":
        gradpruner_ds.save_pretrained(old, template, max_shard_size="100KB")
    kw = {"max_shard_size": "50KB"}  # several shards: the index and shard files are steps too
    work = tmp_path / "work"
    total = _export_in_a_child(new, _fresh(template, work), kill_at=0, **kw)
    assert total is not None and total > 10
    for kill_at in range(1, total + 1):
        out = _fresh(template, work)
        assert _export_in_a_child(new, out, kill_at=kill_at, **kw) is None
        state = _which(out, expect)
        assert state in ({"old", "new"} if start == "previous-export" else {None, "new"}), (kill_at, state)
        if start != "no-folder":
            for rel, text in USER.items():
                found = [p for p in work.glob(f"*/{rel}") if p.read_text() == text]
                assert found, (kill_at, rel, sorted(os.listdir(work)))
        gradpruner_ds.save_pretrained(new, out, **kw)  # the next export
        assert sorted(os.listdir(work)) == ["final"], (kill_at, sorted(os.listdir(work)))
        if start != "no-folder":
            _assert_user_files(out)
        assert _which(out, expect) == "new"


def _fresh(template: Path, work: Path) -> Path:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    if template.exists():
        shutil.copytree(template, work / "final")
    return work / "final"


# ---- read-only and full disks: real file systems (tmpfs) in a mount namespace of a child process --------

_DISKS = r"""
import json, os, shutil, subprocess, sys
from pathlib import Path
import torch
from helpers.tiny import tiny_llama
import gradpruner_ds
from transformers import AutoModelForCausalLM

def mount(path, opts):
    path.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], check=True)

def attempt(model, out):
    try:
        gradpruner_ds.save_pretrained(model, out)
        return "written"
    except ValueError as exc:
        return str(exc)

def pages(n):
    return -(-n // 4096) * 4096

root, result = Path(sys.argv[1]), {}
old, new = tiny_llama(6), tiny_llama(6, seed=1)
weights = sum(p.numel() * 4 for p in new.parameters())
ids = torch.arange(10)[None]

# read-only: a previous export on a file system remounted read-only
mount(root / "ro", "size=4m")
gradpruner_ds.save_pretrained(old, root / "ro" / "final")
subprocess.run(["mount", "-o", "remount,ro", str(root / "ro")], check=True)
result["ro"] = attempt(new, root / "ro" / "final")
result["ro_files"] = sorted(os.listdir(root / "ro"))

# a mount point as the export's folder (its files are built beside it, on another file system)
mount(root / "mp", "size=4m")
result["mp"] = attempt(new, root / "mp")

# too little space for the weights: refused by the free-space check before anything is written
mount(root / "small", f"size={pages(weights) // 2}")
result["small"] = attempt(new, root / "small" / "final")
result["small_files"] = sorted(os.listdir(root / "small"))

# room for the weights but not for the rest (the disk fills up during the export), beside a previous export
mount(root / "full", "size=4m")
gradpruner_ds.save_pretrained(old, root / "full" / "final")
used = sum(pages(p.stat().st_size) for p in (root / "full" / "final").iterdir())
subprocess.run(["mount", "-o", f"remount,size={used + pages(weights) + 4096}", str(root / "full")], check=True)
result["full"] = attempt(new, root / "full" / "final")
result["full_files"] = sorted(os.listdir(root / "full"))
loaded = AutoModelForCausalLM.from_pretrained(root / "full" / "final")
with torch.no_grad():
    result["full_old_intact"] = torch.allclose(loaded(input_ids=ids).logits, old.eval()(input_ids=ids).logits, atol=1e-5)
print("RESULT " + json.dumps(result))
"""


def test_read_only_and_full_disks_are_clear_errors_that_leave_nothing_behind(tmp_path):
    """Real tmpfs file systems in a child's own mount namespace (``unshare``; user namespaces make it work
    without root): a read-only one, one too small for the weights, one that fills up during the export.
    Each is a ``gradpruner:`` error, no temporary folder is left and the previous export still loads. A mount
    point as the folder is refused too."""
    import subprocess
    import sys

    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "-Urm", "true"], capture_output=True).returncode != 0:
        pytest.skip("no unshare with user and mount namespaces on this machine")
    script = tmp_path / "disks.py"
    script.write_text(_DISKS)
    root = tmp_path / "mnt"
    root.mkdir()
    tests = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tests.parent), str(tests)]))
    proc = subprocess.run(
        [unshare, "-Urm", sys.executable, str(script), str(root)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result["ro"].startswith("gradpruner: the export's folder and its parent must be writable"), result
    assert result["ro_files"] == ["final"]
    assert result["mp"].startswith("gradpruner: the export's folder must not be a mount point"), result
    assert result["small"].startswith("gradpruner: the export needs free disk space for its weights"), result
    assert result["small_files"] == []
    assert result["full"].startswith("gradpruner: the export needs free disk space"), result
    assert "No space left on device" in result["full"] and "partial export was removed" in result["full"]
    assert result["full_files"] == ["final"] and result["full_old_intact"]
