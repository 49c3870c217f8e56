"""lm-evaluation-harness task YAMLs for the task files of ``data/`` (offline: local JSONL, no download).

Each task becomes ``gp_<task>`` (multiple choice, metric ``acc``), on the same test split and with the same
prompt and choices as ``launch/tasks.py`` scores them (``prompt + " " + choice``), so lm_eval's accuracy and
ours can be compared item by item:

    python -m launch.lm_eval_tasks --out /tmp/gp_tasks [--max_test 200]
    gradpruner-ds eval --model outputs/demo/final --tasks gp_intent_recognition --include-path /tmp/gp_tasks
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TASKS = {
    "intent_recognition": ROOT / "data" / "bigbench" / "intent_recognition.json",
    "piqa": ROOT / "data" / "piqa",
    "social_iqa": ROOT / "data" / "bigbench" / "social_iqa.json",
    "multiemo": ROOT / "data" / "bigbench" / "multiemo__medicine_text_en.json",
}


def write_task(name: str, path: Path, out: Path, max_test: int | None = None, limit: int | None = None) -> str:
    """Write ``gp_<name>.yaml`` and its test JSONL into ``out``; returns the lm_eval task name."""
    from launch.tasks import load_task, split_task

    test = split_task(load_task(path), seed=0, max_test=max_test).test[:limit]
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"gp_{name}.jsonl"
    data.write_text("".join(json.dumps({"prompt": e.prompt, "choices": list(e.choices), "label": e.label}) + "\n"
                            for e in test))  # fmt: skip
    task = f"gp_{name}"
    (out / f"{task}.yaml").write_text(
        f"task: {task}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{prompt}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\n'
        'target_delimiter: " "\n'
        "metric_list:\n  - metric: acc\n"
    )
    return task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--max_test", type=int, default=None)
    args = ap.parse_args()
    for name in args.tasks.split(","):
        print(write_task(name, TASKS[name], Path(args.out), args.max_test))


if __name__ == "__main__":
    main()
