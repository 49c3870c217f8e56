"""DeepSpeed ZeRO-1/2/3 on real gloo ranks, checked against the single-process result of the same
computation (same model, data, optimizer, schedule, clipping and accumulation)."""

from __future__ import annotations

import pytest
from helpers.ranks import run_ranks
from helpers.training import deepspeed_run, single_process_run

pytestmark = pytest.mark.dist

# the paper's IGIA criterion: these tests check the sharded IGIA computation against one process
BLOCK = {
    "window_steps": 3,
    "num_drop": 1,
    "num_merge": 2,
    "keep_fraction": 0.3,
    "criterion": "igia_sum",
    "progress_bar": False,
}
STEPS, MICRO, GAS, CLIP = 9, 2, 2, 0.5

_refs: dict[tuple, dict] = {}


def reference(world: int, lora: bool = False) -> dict:
    key = (world, lora)
    if key not in _refs:
        _refs[key] = single_process_run(BLOCK, STEPS, world, MICRO, GAS, CLIP, lora=lora)
    return _refs[key]


def assert_matches(ref: dict, results: list[dict]) -> None:
    for r in results:
        assert r["scores"] == pytest.approx(ref["scores"], rel=1e-5)
        for k in ("dropped", "merged", "targets"):
            assert r["plan"][k] == ref["plan"][k], k
        after = r["losses"][BLOCK["window_steps"] :]
        assert len(after) >= 5
        assert r["losses"] == pytest.approx(ref["losses"], abs=1e-5)
        # merge statistics (global mask and merged densities) are the single-process ones
        assert r["merge"] == ref["merge"]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_full_mode_world2_equals_single_process(stage):
    results = run_ranks(deepspeed_run, 2, BLOCK, STEPS, stage, MICRO, GAS, CLIP)
    assert_matches(reference(2), results)


def test_zero3_full_mode_world4_equals_single_process():
    results = run_ranks(deepspeed_run, 4, BLOCK, STEPS, 3, 1, GAS, CLIP, timeout=300)
    ref = single_process_run(BLOCK, STEPS, 4, 1, GAS, CLIP)
    assert_matches(ref, results)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_lora_mode_world2_equals_single_process(stage):
    results = run_ranks(deepspeed_run, 2, BLOCK, STEPS, stage, MICRO, GAS, CLIP, 6, True)
    assert_matches(reference(2, lora=True), results)


@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_runs_to_completion_with_the_same_plan(stage):
    results = run_ranks(deepspeed_run, 2, BLOCK, STEPS, stage, MICRO, GAS, CLIP, 6, False, True)
    ref = reference(2)
    for r in results:
        for k in ("dropped", "merged", "targets"):
            assert r["plan"][k] == ref["plan"][k], k
        assert all(x == x and x < 10 for x in r["losses"])  # finite, sane


@pytest.mark.parametrize("stage,lora", [(3, False), (2, False), (3, True), (1, True)])
def test_observation_gathers_nothing_and_ranking_is_one_all_reduce(stage, lora):
    results = run_ranks(deepspeed_run, 2, BLOCK, STEPS, stage, MICRO, GAS, CLIP, 6, lora, False, True)
    lora_bytes = 6 * 7 * 4 * (32 + 64) * 4  # an upper bound: r=4 factors of every matrix, fp32
    for r in results:
        window = BLOCK["window_steps"]
        # observe() runs every micro-step; it communicates only at the window's accumulation boundaries
        assert len(r["observe_calls"]) == STEPS * GAS
        assert [bool(c) for c in r["observe_calls"]] == [False, True] * window + [False] * (
            STEPS - window
        ) * GAS
        for calls in [c for c in r["observe_calls"] if c]:
            names = [c[0] for c in calls]
            assert (
                "all_gather" not in names
                and "all_gather_into_tensor" not in names
                and "broadcast" not in names
            )
            # full mode: one 1-element all-reduce (the squared grad norm: the clip factor, and non-finite
            # iff some gradient entry is); LoRA mode: plus ONE all-reduce assembling the LoRA factor grads
            assert calls[-1] == ("all_reduce", 1 * 8)
            assert len(calls) == (2 if lora else 1)
            if lora:
                assert calls[0][0] == "all_reduce" and 0 < calls[0][1] <= lora_bytes
        # ranking: ONE all-reduce of the packed score table, then the plan-digest check
        (plan_calls,) = r["plan_calls"]
        assert [c[0] for c in plan_calls] == ["all_reduce", "all_reduce"]
        assert plan_calls[0][1] == (BLOCK["window_steps"] + 2) * 6 * 7 * 8  # float64 table
        # thresholds: four radix passes of [n_matrices, 256] histograms, then the merge counts
        (merge_calls,) = r["merge_calls"]
        assert merge_calls[:4] == [("all_reduce", 2 * 7 * 256 * 8)] * 4
        if stage == 3:  # shard-local merge: nothing else but the counts
            assert merge_calls[4:] == [("all_reduce", 2 * 7 * 2 * 8)]
        assert not any(c[0].startswith("all_gather") for c in merge_calls)


def test_memory_falls_and_old_engine_is_released():
    (r0, r1) = run_ranks(deepspeed_run, 2, BLOCK, STEPS, 3, MICRO, GAS, CLIP, 6, False, False, True)
    for r in (r0, r1):
        assert r["old_engine_alive"] is False
        # 3 of 6 layers removed; embeddings/norms are a small part of this model
        assert r["bytes_after"] < 0.62 * r["bytes_before"], (r["bytes_before"], r["bytes_after"])


@pytest.mark.parametrize("stage,save_at", [(3, 2), (3, 5), (2, 2), (1, 5)])
def test_checkpoint_resume_in_window_and_after_prune(tmp_path, stage, save_at):
    """Save inside the window (IGIA per rank) or after the prune (plan), resume in NEW processes:
    scores, plan and every loss equal the uninterrupted run."""
    full = run_ranks(deepspeed_run, 2, BLOCK, STEPS, stage, MICRO, GAS, CLIP)
    ck = str(tmp_path / "ckpt")
    first = run_ranks(
        deepspeed_run, 2, BLOCK, STEPS, stage, MICRO, GAS, CLIP, 6, False, False, False, ck, save_at
    )
    second = run_ranks(
        deepspeed_run, 2, BLOCK, STEPS, stage, MICRO, GAS, CLIP, 6, False, False, False, ck, None, True
    )
    for a, b, c in zip(full, first, second, strict=True):
        assert b["losses"] + c["losses"] == pytest.approx(a["losses"], abs=1e-6)
        assert c["scores"] == pytest.approx(a["scores"], rel=1e-6)
        assert c["plan"]["dropped"] == a["plan"]["dropped"] and c["plan"]["targets"] == a["plan"]["targets"]
    state = (tmp_path / "ckpt" / f"global_step{save_at}" / "gradpruner" / "state.json").read_text()
    assert ('"plan": null' in state) == (save_at <= BLOCK["window_steps"])


@pytest.mark.parametrize("criterion", ["shortgpt_bi", "obd"])
def test_resume_inside_the_window_under_zero3_in_new_processes(tmp_path, criterion):
    """Each rank's piece of the criterion's statistics (hidden-state sums; IGIA + weights) is saved inside the
    window and restored in new processes: the same scores and plan as the uninterrupted ZeRO-3 run (2 ranks).
    Every registered criterion (restored into new objects in the same ranks):
    ``tests/dist/test_fsdp2.py::test_resume_inside_the_window_for_every_criterion``."""
    block = {**BLOCK, "criterion": criterion, "num_drop": 2, "num_merge": 0}
    full = run_ranks(deepspeed_run, 2, block, STEPS, 3, MICRO, GAS, CLIP)
    ck = str(tmp_path / "ckpt")
    run_ranks(deepspeed_run, 2, block, STEPS, 3, MICRO, GAS, CLIP, 6, False, False, False, ck, 2)
    second = run_ranks(deepspeed_run, 2, block, STEPS, 3, MICRO, GAS, CLIP, 6, False, False, False, ck, None, True)
    for a, c in zip(full, second, strict=True):
        assert c["scores"] == pytest.approx(a["scores"], rel=1e-6)
        assert c["plan"]["dropped"] == a["plan"]["dropped"]


def _disagree(rank: int, world: int, mode: str) -> dict:
    """Rank 1 differs: another keep_fraction (so another plan digest), or it never reaches the check."""
    import time

    block = dict(BLOCK, consensus_timeout_s=5.0)
    if rank == 1 and mode == "settings":
        block["keep_fraction"] = 0.31
    if rank == 1 and mode == "plan":  # same settings, yet other scores (what a bug would do)
        from gradpruner_ds.pruner import GradPruner

        orig_scores = GradPruner.compute_scores
        GradPruner.compute_scores = lambda self: [-s for s in orig_scores(self)]
    if rank == 1 and mode == "absent":  # trains normally, then is stuck elsewhere instead of the check
        import gradpruner_ds.consensus as gdist

        def stuck(*args, **kwargs):
            time.sleep(12.0)
            raise RuntimeError("simulated stuck rank")

        gdist.check_same_plan = stuck
    start = time.monotonic()
    try:
        deepspeed_run(rank, world, block, STEPS, 3, MICRO, GAS, CLIP)
    except (ValueError, RuntimeError) as exc:
        return {"error": str(exc), "elapsed": time.monotonic() - start}
    return {"error": None, "elapsed": time.monotonic() - start}


def test_ranks_with_different_plans_all_fail_fast():
    results = run_ranks(_disagree, 2, "plan", barrier=False, timeout=120)
    for r in results:
        assert r["error"] is not None and r["error"].startswith(
            "gradpruner: the ranks computed different prune plans"
        )


def test_ranks_with_different_settings_fail_at_the_start_naming_the_field():
    results = run_ranks(_disagree, 2, "settings", barrier=False, timeout=120)
    for r in results:
        assert r["error"] is not None and "every rank must run GradPruner with the same settings" in r["error"]
        assert "'keep_fraction': [0.3, 0.31]" in r["error"] and "window_steps" not in r["error"]


def test_a_rank_that_never_reaches_the_plan_check_fails_within_the_timeout():
    r0, r1 = run_ranks(_disagree, 2, "absent", barrier=False, timeout=120)
    assert r0["error"] is not None and r0["error"].startswith(
        "gradpruner: not every rank reached the plan check"
    )
    assert r1["error"] == "simulated stuck rank"


def _crash(rank: int, world: int, where: str, ck: str) -> dict:
    """Rank 1 dies (os._exit) during the window or during the prune's re-partition; checkpoints are
    saved after every step until then."""
    import os

    from gradpruner_ds.backends.deepspeed import DeepSpeedBackend
    from gradpruner_ds.pruner import GradPruner

    if rank == 1 and where == "window":
        orig = GradPruner.observe

        def observe(self):
            if self.steps_seen == 2 and self.backend.at_boundary():
                os._exit(3)
            return orig(self)

        GradPruner.observe = observe
    if rank == 1 and where == "prune":

        def rebuild(self, *args, **kwargs):
            os._exit(3)

        DeepSpeedBackend.rebuild = rebuild
    return deepspeed_run(
        rank, world, BLOCK, STEPS, 3, MICRO, GAS, CLIP, 6, False, False, False, ck, None, False, 1
    )


@pytest.mark.parametrize("where", ["window", "prune"])
def test_a_rank_killed_mid_run_resumes_from_the_last_checkpoint(tmp_path, where):
    ck = str(tmp_path / "ckpt")
    with pytest.raises(AssertionError):  # the job fails: one rank died, the other errors out or is killed
        run_ranks(_crash, 2, where, ck, barrier=False, timeout=90)
    # both crashes happen during optimizer step 3, before its checkpoint: step 2's is the last, intact
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "global_step2"
    assert (tmp_path / "ckpt" / "global_step2" / "gradpruner" / "state.json").exists()
    resumed = run_ranks(
        deepspeed_run, 2, BLOCK, STEPS, 3, MICRO, GAS, CLIP, 6, False, False, False, ck, None, True
    )
    full = reference_ds()
    for r, f in zip(resumed, full, strict=True):
        assert r["scores"] == pytest.approx(f["scores"], rel=1e-6)
        assert r["plan"]["dropped"] == f["plan"]["dropped"] and r["plan"]["targets"] == f["plan"]["targets"]
        n = len(r["losses"])
        assert r["losses"] == pytest.approx(f["losses"][-n:], abs=1e-6)


def _crash_in_save(rank: int, world: int, where: str, ck: str) -> dict:
    """Checkpoints after every step; during the save of step 2's checkpoint one rank dies (os._exit) at
    ``where``: inside DeepSpeed's own save, after it and before GradPruner's state, or (rank 0) after
    every file is written but before the commit."""
    import os

    from deepspeed.runtime.engine import DeepSpeedEngine

    from gradpruner_ds import checkpoint

    state = {"saves": 0}
    if where == "engine" and rank == 1:
        orig_zero = DeepSpeedEngine._save_zero_checkpoint

        def zero_save(self, *a, **kw):
            if self.global_steps == 2:
                os._exit(3)
            return orig_zero(self, *a, **kw)

        DeepSpeedEngine._save_zero_checkpoint = zero_save
    if where in ("gradpruner", "commit"):
        orig_state = checkpoint.save_pruner_state
        orig_commit = checkpoint.commit_checkpoint

        def save_state(pruner, folder, *args):
            state["saves"] += 1
            if where == "gradpruner" and rank == 1 and state["saves"] == 2:
                os._exit(3)
            return orig_state(pruner, folder, *args)

        def commit(save_dir, tag, r, wait_all, **kw):
            if where == "commit" and rank == 0 and state["saves"] == 2:
                os._exit(3)
            return orig_commit(save_dir, tag, r, wait_all, **kw)

        checkpoint.save_pruner_state = save_state
        checkpoint.commit_checkpoint = commit
    return deepspeed_run(
        rank, world, BLOCK, STEPS, 3, MICRO, GAS, CLIP, 6, False, False, False, ck, None, False, 1
    )


@pytest.mark.parametrize("where", ["engine", "gradpruner", "commit"])
def test_a_rank_killed_inside_a_save_leaves_the_previous_checkpoint_resumable(tmp_path, where):
    ck = tmp_path / "ckpt"
    with pytest.raises(AssertionError):
        run_ranks(_crash_in_save, 2, where, str(ck), barrier=False, timeout=90)
    assert (ck / "latest").read_text().strip() == "global_step1"  # never moved to the broken save
    resumed = run_ranks(
        deepspeed_run, 2, BLOCK, STEPS, 3, MICRO, GAS, CLIP, 6, False, False, False, str(ck), None, True
    )
    full = reference_ds()
    for r, f in zip(resumed, full, strict=True):
        assert r["plan"]["dropped"] == f["plan"]["dropped"]
        assert r["losses"] == pytest.approx(f["losses"][-len(r["losses"]) :], abs=1e-6)


def test_resuming_an_incomplete_checkpoint_names_the_intact_one(tmp_path):
    from gradpruner_ds.checkpoint import resolve_tag
    from gradpruner_ds.errors import GradPrunerError

    ck = tmp_path / "ckpt"
    run_ranks(deepspeed_run, 2, BLOCK, STEPS, 3, MICRO, GAS, CLIP, 6, False, False, False, str(ck), 2)
    assert resolve_tag(ck, None) == "global_step2"
    (ck / "global_step3").mkdir()  # a save that died before its commit, named by hand
    (ck / "latest").write_text("global_step3")
    with pytest.raises(GradPrunerError, match="tag='global_step2'"):
        resolve_tag(ck, None)


def _with_csv_monitor(rank: int, world: int, out: str) -> dict:
    """deepspeed_run with DeepSpeed's CSV monitor enabled in the config."""
    from helpers import training

    plain = training.ds_config

    def with_monitor(*a, **kw):
        cfg = plain(*a, **kw)
        cfg["csv_monitor"] = {"enabled": True, "output_path": out, "job_name": "gp"}
        return cfg

    training.ds_config = with_monitor
    return deepspeed_run(rank, world, BLOCK, STEPS, 2, MICRO, GAS, CLIP)


def test_the_prune_reaches_deepspeeds_monitor(tmp_path):
    """The config's csv_monitor (like tensorboard / wandb) receives the prune's events at the prune, on the axis
    of DeepSpeed's own series (samples)."""
    import csv

    r0, _ = run_ranks(_with_csv_monitor, 2, str(tmp_path))
    files = {p.name: p for p in tmp_path.rglob("gradpruner_*.csv")}

    def rows(name: str) -> list[list[str]]:
        return list(csv.reader(files[f"gradpruner_{name}.csv"].open()))[1:]

    # 6 layers, 3 removed, at the prune; x = the engine's sample count, the x-axis of DeepSpeed's own series
    samples = BLOCK["window_steps"] * MICRO * GAS * 2
    assert rows("layers_after") == [[str(samples), "3.0"]]
    removed = [i for i in range(6) if float(rows(f"removed_{i}")[0][1]) == 1.0]
    assert removed == sorted(r0["plan"]["dropped"] + r0["plan"]["merged"])


_ds_full: list = []


def reference_ds() -> list[dict]:
    if not _ds_full:
        _ds_full.extend(run_ranks(deepspeed_run, 2, BLOCK, STEPS, 3, MICRO, GAS, CLIP))
    return _ds_full


@pytest.mark.slow
def test_zero3_cpu_optimizer_offload_gives_the_same_plan_and_losses():
    """ZeRO-3 with offload_optimizer (DeepSpeed CPU Adam; its op is built once, ~1-2 min) through
    observation -> prune -> re-partition -> continue, against the same run without offload."""
    plain = run_ranks(deepspeed_run, 2, BLOCK, STEPS, 3, MICRO, GAS, CLIP)
    off = run_ranks(
        deepspeed_run,
        2,
        BLOCK,
        STEPS,
        3,
        MICRO,
        GAS,
        CLIP,
        6,
        False,
        False,
        False,
        None,
        None,
        False,
        None,
        True,
        timeout=600,
    )
    for a, b in zip(plain, off, strict=True):
        assert b["plan"]["dropped"] == a["plan"]["dropped"] and b["plan"]["targets"] == a["plan"]["targets"]
        assert b["scores"] == pytest.approx(a["scores"], rel=1e-5)
        assert b["losses"] == pytest.approx(a["losses"], abs=1e-5)


@pytest.mark.parametrize("stage", [2, 3])
def test_default_criterion_block_influence_equals_single_process(stage):
    """The default criterion (hidden-state statistics, additive over ranks) under ZeRO."""
    block = {k: v for k, v in BLOCK.items() if k != "criterion"}
    ref = single_process_run(block, STEPS, 2, MICRO, GAS, CLIP)
    assert ref["plan"]["criterion"] == "shortgpt_bi"
    assert_matches(ref, run_ranks(deepspeed_run, 2, block, STEPS, stage, MICRO, GAS, CLIP))


@pytest.mark.parametrize("stage", [2, 3])
def test_laco_merge_rule_world2_equals_single_process(stage):
    """The LaCo-style baseline merge (unmasked differences) through the same sharded merge paths."""
    block = {**BLOCK, "merge_rule": "laco"}
    results = run_ranks(deepspeed_run, 2, block, STEPS, stage, MICRO, GAS, CLIP)
    ref = single_process_run(block, STEPS, 2, MICRO, GAS, CLIP)
    assert_matches(ref, results)
    assert all(s["mask_density"] == 1.0 == s["merged_density"] for s in ref["merge"])
    assert ref["losses"][: BLOCK["window_steps"]] == reference(2)["losses"][: BLOCK["window_steps"]]
    assert ref["losses"][BLOCK["window_steps"]] != reference(2)["losses"][BLOCK["window_steps"]]


def _torn_fixed_tag(rank: int, world: int, ck: str) -> dict:
    """Every step saved under ONE tag ("latest-save"); rank 1 dies inside DeepSpeed's part of the second save,
    after the first save under the same tag committed."""
    import os

    from deepspeed.runtime.engine import DeepSpeedEngine

    from gradpruner_ds import checkpoint

    if rank == 1:
        orig = DeepSpeedEngine._save_zero_checkpoint

        def dying(self, *a, **kw):
            if self.global_steps == 2:
                os._exit(3)
            return orig(self, *a, **kw)

        DeepSpeedEngine._save_zero_checkpoint = dying
    orig_save = checkpoint.save_checkpoint

    def fixed(engine, pruner, save_dir, tag=None, *a, **kw):
        return orig_save(engine, pruner, save_dir, "latest-save", *a, **kw)

    checkpoint.save_checkpoint = fixed  # deepspeed_run imports it at its call: it gets this one
    return deepspeed_run(rank, world, BLOCK, STEPS, 3, MICRO, GAS, CLIP, 6, False, False, False, ck, None, False, 1)


def test_a_rank_killed_while_resaving_under_the_same_tag_is_never_resumed(tmp_path):
    """The tag's marker goes before the second save writes anything: the torn tag (rank 0's Adam state of step
    2 beside rank 1's of step 1) is refused, not resumed."""
    from gradpruner_ds.checkpoint import complete, resolve_tag
    from gradpruner_ds.errors import GradPrunerError

    ck = tmp_path / "ckpt"
    with pytest.raises(AssertionError):
        run_ranks(_torn_fixed_tag, 2, str(ck), barrier=False, timeout=90)
    assert (ck / "latest").read_text().strip() == "latest-save"
    assert not complete(ck / "latest-save")
    with pytest.raises(GradPrunerError, match="must be complete"):
        resolve_tag(ck, None)
