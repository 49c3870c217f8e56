"""The cross-task summary of the quality benchmark (benchmarks/quality/summarize.py): how arm results are
paired with the dense run of the same data order, named by task and averaged. These tables carry the
numbers in docs/results.md, so their arithmetic is checked here on arm files written in the harness's
format (one JSON per arm: arm name, data order, seed, accuracy, re-tuning losses)."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_script(name: str):
    """A module of benchmarks/quality (scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "quality" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def summarize():
    return load_script("summarize")


def write_arm(folder: Path, arm: str, accuracy: float, loss: float) -> None:
    order = int(arm.split("#d")[1]) if "#d" in arm else 0
    seed = int(arm.split("#s")[1]) if "#s" in arm else 0
    (folder / "arms").mkdir(parents=True, exist_ok=True)
    rec = {
        "arm": arm,
        "data_order": order,
        "seed": seed,
        "accuracy": accuracy,
        "retune_losses": [9.0, loss, loss, loss],
    }
    (folder / "arms" / f"{arm}.json").write_text(json.dumps(rec))


def test_pairs_each_run_with_the_dense_run_of_its_data_order(tmp_path, summarize):
    a = tmp_path / "intent_recognition_b40_r32"  # suffixes _b<N>, _w<N>, _r<N> name the same task
    write_arm(a, "dense", 0.60, 1.0)
    write_arm(a, "dense#d1", 0.80, 2.0)
    write_arm(a, "shortgpt_bi@0.3", 0.50, 3.0)
    write_arm(a, "shortgpt_bi@0.3#d1", 0.75, 4.0)
    write_arm(a, "shortgpt_bi@0.3#d2", 0.70, 2.1)  # no dense run with order 2: the mean of the dense runs
    table = summarize.collect([a])

    (cell,) = table[("shortgpt_bi", "0.3")]
    assert cell.task == "intent"
    expected = {(0, 0): -10.0, (1, 0): -5.0, (2, 0): 0.0}
    assert cell.deltas.keys() == expected.keys()
    assert all(math.isclose(cell.deltas[k], v, abs_tol=1e-9) for k, v in expected.items())
    assert math.isclose(cell.mean, -5.0, abs_tol=1e-9)
    assert math.isclose(cell.sd, 5.0, abs_tol=1e-9)
    assert math.isclose(cell.loss, statistics.fmean([3.0, 2.0, 1.4]))  # losses over the paired dense ones


def test_cross_task_mean_and_spread_over_paired_runs(tmp_path, summarize):
    for name, dense, arm in (
        ("piqa_b20", (0.6, 0.5), (0.5, 0.5)),
        ("social_iqa_b20", (0.4, 0.4), (0.2, 0.3)),
    ):
        folder = tmp_path / name
        write_arm(folder, "dense", dense[0], 1.0)
        write_arm(folder, "dense#d1", dense[1], 1.0)
        write_arm(folder, "angular@0.2", arm[0], 1.0)
        write_arm(folder, "angular@0.2#d1", arm[1], 1.0)
    table = summarize.collect([tmp_path / "piqa_b20", tmp_path / "social_iqa_b20"])
    cells = table[("angular", "0.2")]
    assert sorted(c.task for c in cells) == ["piqa", "siqa"]
    # run 0: piqa -10, siqa -20 -> -15; run 1: piqa 0, siqa -10 -> -5
    assert math.isclose(summarize.cross_task_sd(cells), statistics.stdev([-15.0, -5.0]))
    assert math.isclose(statistics.fmean(c.mean for c in cells), -10.0)

    write_arm(tmp_path / "piqa_b20", "angular@0.2#d2", 0.5, 1.0)  # runs no longer paired across tasks
    assert (
        summarize.cross_task_sd(
            summarize.collect([tmp_path / "piqa_b20", tmp_path / "social_iqa_b20"])[("angular", "0.2")]
        )
        is None
    )


def test_budget_and_variant_suffixes_split_the_rows(tmp_path, summarize):
    folder = tmp_path / "multiemo"
    write_arm(folder, "dense", 0.5, 1.0)
    for arm in ("igia_sum@0.3", "igia_sum@0.3+m3", "igia_sum@0.3~lora", "random@0.3#s1", "random@0.3#s2"):
        write_arm(folder, arm, 0.4, 1.0)
    table = summarize.collect([folder])
    assert {k for k in table if k[0] != "dense"} == {
        ("igia_sum", "0.3"),
        ("igia_sum+m3", "0.3"),
        ("igia_sum~lora", "0.3"),
        ("random", "0.3"),
    }
    assert set(table[("random", "0.3")][0].deltas) == {(0, 1), (0, 2)}  # seeds are separate runs


def test_paired_difference_with_the_default_over_data_orders(tmp_path, summarize):
    for name, dense, default, arm in (
        ("piqa", (0.6, 0.5), (0.5, 0.4), (0.55, 0.5)),
        ("social_iqa", (0.4, 0.4), (0.3, 0.3), (0.3, 0.4)),
    ):
        folder = tmp_path / name
        for suffix, i in (("", 0), ("#d1", 1)):
            write_arm(folder, f"dense{suffix}", dense[i], 1.0)
            write_arm(folder, f"shortgpt_bi@0.3{suffix}", default[i], 1.0)
            write_arm(folder, f"obd@0.3{suffix}", arm[i], 1.0)
        write_arm(folder, "random@0.3#s0", 0.2, 1.0)  # seeds: order 0 only, averaged within the order
        write_arm(folder, "random@0.3#s1", 0.4, 1.0)
    table = summarize.collect([tmp_path / "piqa", tmp_path / "social_iqa"])
    # arm - default per (task, order): piqa +5, +10; siqa 0, +10 -> per order +2.5, +10
    mean_obd, se_obd, n = summarize.paired_vs(table[("obd", "0.3")], table[("shortgpt_bi", "0.3")])
    assert n == 2 and math.isclose(mean_obd, 6.25)
    assert se_obd is not None and math.isclose(se_obd, statistics.stdev([2.5, 10.0]) / 2**0.5)
    # random: piqa 0.3 - 0.5 = -20, siqa 0.3 - 0.3 = 0 -> one order, -10, no standard error
    mean, se, n = summarize.paired_vs(table[("random", "0.3")], table[("shortgpt_bi", "0.3")])
    assert n == 1 and se is None and math.isclose(mean, -10.0)
    rows = summarize.render([tmp_path / "piqa", tmp_path / "social_iqa"]).splitlines()
    (obd_row,) = [r for r in rows if r.startswith("| obd |")]
    assert f"| {mean_obd:+.1f} ± {se_obd:.1f} (2) |" in obd_row
    (default_row,) = [r for r in rows if r.startswith("| shortgpt_bi |")]
    assert default_row.split(" | ")[6] == "-"


def test_docs_tables_match_committed_results():
    """The generated blocks of docs/results.md (tables, compute minutes) and their copies under
    docs/benchmarks equal what the arm results in results/quality give today."""
    mod = load_script("update_docs")
    text = mod.DOC.read_text()
    assert text.count("<!-- summary suffix=") == 6 and text.count("<!-- summary folders=") == 3
    assert text.count("<!-- compute ") == 3
    new, copies = mod.generate(text)
    assert new == text, "docs/results.md is out of date: python -m benchmarks.quality.update_docs"
    for path, table in copies.items():
        assert (ROOT / path).read_text() == table, path


def write_run(out: Path, group: str, arm: str, seed: int, acc: float, **fields: object) -> None:
    """One full-run cell in the format fullrun.py writes (the fields the tables read, and any ``fields``)."""
    folder = out / group / f"{arm}#s{seed}"
    folder.mkdir(parents=True)
    curve = [{"step": 12, "accuracy": acc / 2}, {"step": 60, "accuracy": acc}]
    rec = {"arm": arm, "seed": seed, "acc_after": acc, "curve": curve, "train_s": 100.0,
           "dense_layers": 30, "pruned_layers": 30 if arm == "dense" else 21, **fields}  # fmt: skip
    (folder / "summary.json").write_text(json.dumps(rec))


def test_full_run_tables_pair_by_seed_share_dense_across_budgets_and_average_tasks(tmp_path):
    fullrun = load_script("summarize_fullrun")
    for seed, (dense, arm) in enumerate([(0.90, 0.85), (0.80, 0.79)]):
        write_run(tmp_path, "intent_recognition_b30", "dense", seed, dense)
        write_run(tmp_path, "intent_recognition_b30", "obd", seed, arm)
    write_run(tmp_path, "intent_recognition_b40", "obd", 0, 0.70)  # dense borrowed from the 30% folder
    write_run(tmp_path, "piqa_b30", "dense", 0, 0.60)
    write_run(tmp_path, "piqa_b30", "obd", 0, 0.62)
    write_run(tmp_path, "piqa_b30", "obd", 1, 0.50)  # no dense run of seed 1 on piqa: not paired
    runs = fullrun.load(tmp_path)
    assert fullrun.paired(runs["intent_recognition_b30"], "obd") == pytest.approx([-0.05, -0.01])
    assert fullrun.paired(runs["intent_recognition_b40"], "obd") == pytest.approx([-0.20])
    assert fullrun.paired(runs["piqa_b30"], "obd") == pytest.approx([0.02])
    text = fullrun.print_tables(tmp_path)
    assert "| obd | 0,1 | 41.0 ± 1.5 | 82.0 ± 3.0 | -3.0 ± 2.0 (n=2) | 100 | 21 |" in text
    # over tasks: intent -3.0 (se 2.0), piqa +2.0 (one seed: no se) -> mean -0.5, no se; % of dense kept: intent
    # (85/90 + 79/80) / 2 = 96.6%, piqa 62/60 = 103.3% -> 100.0%; above chance (1/7 on intent, 1/2 on piqa):
    # intent ((0.85-c)/(0.9-c) + (0.79-c)/(0.8-c)) / 2 = 95.9%, piqa 0.12/0.10 = 120% -> 108%
    assert "| obd | -3.0 ± 2.0 (n=2) | +2.0 (n=1) | -0.5 | 100.0% | 108% | 2/2 |" in text
    assert "| obd | -20.0 (n=1) | -20.0 | 77.8% | 74% | 1/1 |" in text  # the 40% table
    # no <default>+<option> arm and no run with losses: those two tables are left out, not printed empty
    assert "minus plain" not in text and "right after the cut" not in text


def test_loss_right_after_the_cut_is_paired_with_dense_on_the_same_step(tmp_path):
    """The cut's cost with no further training: the pruned run's loss on the first batch after its (last) cut
    minus dense's on that batch; the step is the run's prune_step, or its window for runs from before the field;
    distillation arms (their logged loss is the distillation objective) and runs without losses are left out."""
    fullrun = load_script("summarize_fullrun")
    dense = [3.0, 3.1, 3.2, 3.3, 3.4, 3.5, 3.6]
    for seed in (0, 1):
        write_run(tmp_path, "piqa_b30", "dense", seed, 0.6, losses=dense)
        write_run(tmp_path, "piqa_b30", "shortgpt_bi", seed, 0.55, losses=[*dense[:4], 5.0 + seed, 4.0, 3.9], window=4)
        write_run(tmp_path, "piqa_b30", "shortgpt_bi+rep2", seed, 0.56, losses=[*dense[:6], 4.1], prune_step=6)
        write_run(tmp_path, "piqa_b30", "shortgpt_bi+kd8", seed, 0.55, losses=[*dense[:4], 0.1, 0.1, 0.1], window=4)
    write_run(tmp_path, "piqa_b30", "obd", 0, 0.5)  # no losses
    runs = fullrun.load(tmp_path)["piqa_b30"]
    assert fullrun.cut_jump(runs, "shortgpt_bi") == pytest.approx([1.6, 2.6])
    assert fullrun.cut_jump(runs, "shortgpt_bi+rep2") == pytest.approx([0.5, 0.5])
    assert fullrun.cut_jump(runs, "shortgpt_bi+kd8") == [] and fullrun.cut_jump(runs, "obd") == []
    text = fullrun.print_tables(tmp_path)
    assert "| shortgpt_bi | +2.10 ± 0.50 (n=2) | +2.10 | 1/1 |" in text
    assert "| shortgpt_bi+rep2 | +0.50 ± 0.00 (n=2) | +0.50 | 1/1 |" in text
    # against plain removal by the same criterion, seed by seed: 0.56 - 0.55 on both seeds
    assert fullrun.paired(runs, "shortgpt_bi+rep2", ref="shortgpt_bi") == pytest.approx([0.01, 0.01])
    assert "| shortgpt_bi+rep2 | +1.0 ± 0.0 (n=2) | +1.0 | +1.0 +1.0 |" in text


def test_training_loss_over_step_ranges_against_plain_removal_and_dense(tmp_path):
    """Whether a difference at the cut lasts: the mean training loss over each step range (a run shorter than
    the range counts its own part), plain removal against dense and each option against plain removal."""
    fullrun = load_script("summarize_fullrun")
    steps = 40
    dense = [1.0] * steps
    plain = [1.0] * 4 + [2.0] * 16 + [1.5] * (steps - 20)
    rep = [1.0] * 12 + [1.75] * 8 + [1.5] * (steps - 20)
    for seed in (0, 1):
        write_run(tmp_path, "piqa_b30", "dense", seed, 0.6, losses=dense)
        write_run(tmp_path, "piqa_b30", "shortgpt_bi", seed, 0.55, losses=plain)
        write_run(tmp_path, "piqa_b30", "shortgpt_bi+rep8", seed, 0.55, losses=rep, prune_step=12)
    runs = fullrun.load(tmp_path)["piqa_b30"]
    assert fullrun.loss_gap(runs, "shortgpt_bi+rep8", "shortgpt_bi", 12, 20) == pytest.approx([-0.25, -0.25])
    assert fullrun.loss_gap(runs, "shortgpt_bi", "dense", 36, 68) == pytest.approx([0.5, 0.5])  # steps 36-39
    assert fullrun.loss_gap(runs, "shortgpt_bi", "dense", 68, None) == []  # the runs end before step 68
    text = fullrun.print_tables(tmp_path)
    assert "| piqa | shortgpt_bi | dense | 2 | +1.00 | +0.50 | +0.50 |  |" in text
    assert "| piqa | shortgpt_bi+rep8 | shortgpt_bi | 2 | -0.25 | +0.00 | +0.00 |  |" in text


def test_longer_protocols_are_named_in_the_table_titles():
    fullrun = load_script("summarize_fullrun")
    assert fullrun.label("30") == "30% of layers removed"
    assert fullrun.label("30_e3s360") == "30% of layers removed, 3 epochs capped at 360 steps"
