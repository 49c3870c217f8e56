"""Multiple-choice task data: loading, deterministic splits, training batches and log-likelihood scoring.

Two on-disk formats are understood (see :func:`load_task`):

* a BIG-bench JSON task file (``examples[*].input`` + ``examples[*].target_scores``);
* PIQA (``valid.jsonl`` with ``{goal, sol1, sol2}`` per line and an aligned ``valid-labels.lst``).

Every example becomes a :class:`ChoiceExample` whose ``prompt`` ends with a cue (``"Answer:"`` or the
task's own output prefix) and whose choices are appended with a single leading space. Tokenisation
is always done as ``ids(prompt) + ids(" " + choice)`` (prompt and choice encoded separately), both for
training (:func:`build_train_dataset`) and for scoring (:func:`score_choices`), so the boundary
between prompt and answer is exact and identical in both places.
"""

from __future__ import annotations

import inspect
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gradpruner_ds.errors import user_error
from gradpruner_ds.log import get_logger

__all__ = [
    "ChoiceExample",
    "TaskSplit",
    "load_task",
    "split_task",
    "build_train_dataset",
    "collate",
    "score_choices",
    "evaluate_choices",
    "predict_choices",
    "IGNORE_INDEX",
]

_log = get_logger("tasks")

IGNORE_INDEX = -100
"""Label value ignored by the causal-LM loss (prompt tokens and padding)."""

_DEFAULT_CUE = "Answer:"


@dataclass(frozen=True)
class ChoiceExample:
    """One multiple-choice item: ``prompt + " " + choices[label]`` is the correct completion."""

    prompt: str
    """The text before the answer, already formatted (question/goal + a cue such as ``"Answer:"``)."""
    choices: tuple[str, ...]
    """The candidate answers; each is appended to ``prompt`` with one leading space."""
    label: int
    """Index of the correct choice in ``choices``."""

    def __post_init__(self) -> None:
        if len(self.choices) < 2:
            raise user_error(
                "a ChoiceExample needs at least 2 choices", self.choices, "give two or more choices"
            )
        if not 0 <= self.label < len(self.choices):
            raise user_error(
                "ChoiceExample.label must index into choices",
                self.label,
                f"use a label in [0, {len(self.choices) - 1}]",
            )

    @property
    def answer(self) -> str:
        """The correct answer string."""
        return self.choices[self.label]

    def key(self) -> tuple[str, tuple[str, ...]]:
        """Identity used for de-duplication: the prompt and the (order-insensitive) set of choices."""
        return (self.prompt, tuple(sorted(self.choices)))


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load_task(path: str | Path) -> list[ChoiceExample]:
    """Load a multiple-choice task file into :class:`ChoiceExample` items, in file order.

    Accepted ``path``:

    * a BIG-bench JSON task file (``*.json`` with an ``examples`` list of ``{input, target_scores}``).
      Exactly one choice per example must have score 1; the choice order is the key order of
      ``target_scores`` in the file. Prompt template::

          [task_prefix + "\\n"] + input.strip() + "\\n" + cue

      where ``task_prefix`` is the file's ``task_prefix`` (instruction text; e.g. the intent list in
      ``intent_recognition``) when present and ``cue`` is the stripped ``example_output_prefix`` of the
      file when present (``"Intent:"`` for intent_recognition) and ``"Answer:"`` otherwise. Choices are
      not appended to the input (log-likelihood scoring ranks them instead).
    * PIQA: the ``piqa`` folder, or its ``valid.jsonl`` / ``train.jsonl`` file, with the aligned
      ``<split>-labels.lst`` beside it. Prompt template: ``"Question: " + goal + "\\nAnswer:"``;
      choices ``(sol1, sol2)`` stripped of surrounding whitespace (as in lm-evaluation-harness).

    Raises a ``gradpruner:`` :class:`ValueError` naming the file and the fix for a missing path, an
    unknown format or a malformed file.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise user_error("task path does not exist", str(p), "pass a BIG-bench .json file or a PIQA folder")
    if p.is_dir():
        candidate = p / "valid.jsonl"
        if candidate.is_file():
            return _load_piqa(candidate)
        raise user_error(
            "task folder is not a PIQA folder (no valid.jsonl inside)",
            str(p),
            "pass a BIG-bench .json task file, or a folder holding valid.jsonl + valid-labels.lst",
        )
    if p.suffix == ".jsonl":
        return _load_piqa(p)
    if p.suffix == ".json":
        return _load_bigbench(p)
    raise user_error(
        "unknown task file format (expected .json BIG-bench task or PIQA .jsonl)",
        str(p),
        "pass a BIG-bench .json task file, a PIQA folder or its valid.jsonl",
    )


def _load_bigbench(path: Path) -> list[ChoiceExample]:
    try:
        with path.open(encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise user_error(
            f"cannot read BIG-bench task file {path} ({exc})", str(path), "pass a valid BIG-bench JSON file"
        ) from exc
    examples = data.get("examples") if isinstance(data, dict) else None
    if not isinstance(examples, list) or not examples:
        raise user_error(
            f"BIG-bench task file {path} has no non-empty 'examples' list",
            type(examples).__name__,
            "pass a BIG-bench JSON task with examples[*].input and examples[*].target_scores",
        )
    prefix = data.get("task_prefix") or ""
    prefix = prefix.strip()
    cue = (data.get("example_output_prefix") or "").strip() or _DEFAULT_CUE
    head = f"{prefix}\n" if prefix else ""

    out: list[ChoiceExample] = []
    for i, ex in enumerate(examples):
        where = f"{path} examples[{i}]"
        if not isinstance(ex, dict) or not isinstance(ex.get("input"), str):
            raise user_error(f"{where} has no string 'input'", ex, "fix or remove this example")
        scores = ex.get("target_scores")
        if not isinstance(scores, dict) or len(scores) < 2:
            raise user_error(
                f"{where} needs a 'target_scores' dict with at least 2 choices",
                scores,
                "only multiple-choice BIG-bench tasks (target_scores) are supported",
            )
        choices = tuple(str(c).strip() for c in scores)
        correct = [j for j, v in enumerate(scores.values()) if _is_one(v)]
        if len(correct) != 1:
            raise user_error(
                f"{where} must have exactly one choice with score 1",
                scores,
                "fix the target_scores of this example",
            )
        if len(set(choices)) != len(choices):
            raise user_error(f"{where} has duplicate choices", choices, "make the choices distinct")
        prompt = f"{head}{ex['input'].strip()}\n{cue}"
        out.append(ChoiceExample(prompt=prompt, choices=choices, label=correct[0]))
    _log.debug("loaded %d BIG-bench examples from %s", len(out), path)
    return out


def _is_one(value: Any) -> bool:
    try:
        return float(value) == 1.0
    except (TypeError, ValueError):
        return False


def _load_piqa(path: Path) -> list[ChoiceExample]:
    split = path.name[: -len(".jsonl")]
    labels_path = path.with_name(f"{split}-labels.lst")
    if not labels_path.is_file():
        raise user_error(
            f"PIQA labels file missing next to {path}",
            str(labels_path),
            f"put the aligned {labels_path.name} (one 0/1 per line) beside {path.name}",
        )
    try:
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        labels = [ln.strip() for ln in labels_path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise user_error(
            f"cannot read PIQA files ({exc})", str(path), "check the files are readable UTF-8"
        ) from exc
    if len(lines) != len(labels):
        raise user_error(
            f"PIQA {path.name} and {labels_path.name} are not aligned (line counts differ)",
            (len(lines), len(labels)),
            "use the matching labels file (one label per jsonl line)",
        )
    if not lines:
        raise user_error(f"PIQA file {path} is empty", str(path), "pass a non-empty PIQA split")
    out: list[ChoiceExample] = []
    for i, (line, lab) in enumerate(zip(lines, labels, strict=True)):
        where = f"{path} line {i + 1}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise user_error(f"{where} is not valid JSON ({exc})", line[:80], "fix the line") from exc
        if not isinstance(row, dict) or not all(
            isinstance(row.get(k), str) for k in ("goal", "sol1", "sol2")
        ):
            raise user_error(f"{where} needs string fields goal, sol1, sol2", row, "fix the line")
        if lab not in ("0", "1"):
            raise user_error(f"{labels_path} line {i + 1} must be 0 or 1", lab, "fix the labels file")
        out.append(
            ChoiceExample(
                prompt=f"Question: {row['goal'].strip()}\n{_DEFAULT_CUE}",
                choices=(row["sol1"].strip(), row["sol2"].strip()),
                label=int(lab),
            )
        )
    _log.debug("loaded %d PIQA examples from %s", len(out), path)
    return out


# --------------------------------------------------------------------------------------------------
# Splitting
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSplit:
    """Disjoint train / validation / test lists of examples."""

    train: list[ChoiceExample]
    val: list[ChoiceExample]
    test: list[ChoiceExample]


def split_task(
    examples: Sequence[ChoiceExample],
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    max_test: int | None = None,
) -> TaskSplit:
    """Split examples deterministically into disjoint train / val / test lists.

    Rule (depends only on the input order, ``seed`` and the arguments):

    1. ``order = list(range(n)); random.Random(seed).shuffle(order)``.
    2. ``n_test = round(n * test_fraction)`` (at least 1 when ``test_fraction > 0``), then capped at
       ``max_test`` if given; ``n_val = round(n * val_fraction)`` (at least 1 when ``val_fraction > 0``).
    3. ``test = order[:n_test]``, ``val = order[n_test:n_test + n_val]``, ``train = the rest``
       (so examples freed by ``max_test`` go to train). Each list keeps the permuted order.
    4. De-duplication (no test item in training): any val or train example whose :meth:`ChoiceExample.key`
       (prompt + set of choices) also occurs in test is dropped, and any train example whose key occurs
       in val is dropped. Test is never reduced.
    """
    n = len(examples)
    if n == 0:
        raise user_error("cannot split an empty task", n, "load a task with at least 3 examples")
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= frac < 1.0:
            raise user_error(f"{name} must be in [0, 1)", frac, f"pass e.g. {name}=0.1")
    if val_fraction + test_fraction >= 1.0:
        raise user_error(
            "val_fraction + test_fraction must leave room for training (< 1)",
            val_fraction + test_fraction,
            "lower val_fraction or test_fraction",
        )
    if max_test is not None and max_test < 0:
        raise user_error("max_test must be >= 0 or None", max_test, "pass a non-negative max_test or None")

    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_test = _count(n, test_fraction)
    if max_test is not None:
        n_test = min(n_test, max_test)
    n_val = _count(n, val_fraction)
    if n_test + n_val >= n:
        raise user_error(
            "too few examples to split into non-empty train / val / test",
            n,
            "use more examples or smaller val_fraction / test_fraction",
        )
    test = [examples[i] for i in order[:n_test]]
    val = [examples[i] for i in order[n_test : n_test + n_val]]
    train = [examples[i] for i in order[n_test + n_val :]]

    test_keys = {e.key() for e in test}
    val_kept = [e for e in val if e.key() not in test_keys]
    held_keys = test_keys | {e.key() for e in val_kept}
    train_kept = [e for e in train if e.key() not in held_keys]
    dropped = (len(val) - len(val_kept)) + (len(train) - len(train_kept))
    if dropped:
        _log.info("split_task: dropped %d duplicate(s) of held-out examples from train/val", dropped)
    if not train_kept:
        raise user_error(
            "train split is empty after removing duplicates of held-out items",
            n,
            "use more examples or smaller val_fraction / test_fraction",
        )
    return TaskSplit(train=train_kept, val=val_kept, test=test)


def _count(n: int, frac: float) -> int:
    if frac <= 0.0:
        return 0
    return max(1, int(round(n * frac)))


# --------------------------------------------------------------------------------------------------
# Tokenisation helpers
# --------------------------------------------------------------------------------------------------


def _bos_prefix(tokenizer: Any) -> list[int]:
    """The BOS id the tokenizer itself would prepend (``[]`` if it adds none)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    specials = list(tokenizer("", add_special_tokens=True)["input_ids"])
    return [bos] if specials[:1] == [bos] else []


def _encode_pairs(
    tokenizer: Any, prompts: Sequence[str], continuations: Sequence[str]
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of each prompt (with the tokenizer's BOS if it uses one) and of each continuation.

    Each distinct string is encoded once (prompts repeat across the choices of an example).
    """
    bos = _bos_prefix(tokenizer)
    uniq_p = list(dict.fromkeys(prompts))
    uniq_c = list(dict.fromkeys(continuations))
    enc_p = tokenizer(uniq_p, add_special_tokens=False)["input_ids"] if uniq_p else []
    enc_c = tokenizer(uniq_c, add_special_tokens=False)["input_ids"] if uniq_c else []
    p_map = {s: bos + list(ids) for s, ids in zip(uniq_p, enc_p, strict=True)}
    c_map = {s: list(ids) for s, ids in zip(uniq_c, enc_c, strict=True)}
    return [p_map[s] for s in prompts], [c_map[s] for s in continuations]


def _fit(
    prompt_ids: list[int], cont_ids: list[int], max_length: int, keep_first: bool
) -> tuple[list[int], list[int]]:
    """Truncate to ``max_length`` tokens: the continuation is kept (cut at the right only if it alone
    does not fit with one prompt token), the prompt loses tokens from its left (keeping its first token
    when ``keep_first``, i.e. the BOS)."""
    if max_length < 2:
        raise user_error("max_length must be >= 2", max_length, "pass max_length of at least 2 (e.g. 256)")
    if len(prompt_ids) + len(cont_ids) <= max_length:
        return prompt_ids, cont_ids
    cont_ids = cont_ids[: max_length - (2 if keep_first and len(prompt_ids) > 1 else 1)]
    room = max_length - len(cont_ids)
    if len(prompt_ids) > room:
        prompt_ids = (
            prompt_ids[:1] + prompt_ids[len(prompt_ids) - room + 1 :] if keep_first else prompt_ids[-room:]
        )
    return prompt_ids, cont_ids


def _continuation(choice: str) -> str:
    return " " + choice


# --------------------------------------------------------------------------------------------------
# Training data
# --------------------------------------------------------------------------------------------------


def build_train_dataset(
    tokenizer: Any, examples: Sequence[ChoiceExample], max_length: int = 256
) -> list[dict[str, torch.Tensor]]:
    """Causal-LM fine-tuning items for ``prompt + " " + correct answer + eos``.

    Each item holds unpadded 1-D ``input_ids``, ``attention_mask`` (all ones) and ``labels`` (a copy of
    ``input_ids`` with ``-100`` on the prompt tokens, so the loss covers the answer and the eos only).
    Over-long items are truncated to ``max_length`` by dropping prompt tokens from the left (the BOS, if
    the tokenizer uses one, is kept). Pad and batch them with :func:`collate`.
    """
    if not examples:
        return []
    eos = getattr(tokenizer, "eos_token_id", None)
    bos = _bos_prefix(tokenizer)
    prompts_ids, answers_ids = _encode_pairs(
        tokenizer, [e.prompt for e in examples], [_continuation(e.answer) for e in examples]
    )
    items: list[dict[str, torch.Tensor]] = []
    for p_ids, a_ids in zip(prompts_ids, answers_ids, strict=True):
        cont = a_ids + ([eos] if eos is not None else [])
        p_ids, cont = _fit(p_ids, cont, max_length, keep_first=bool(bos))
        ids = torch.tensor(p_ids + cont, dtype=torch.long)
        labels = ids.clone()
        labels[: len(p_ids)] = IGNORE_INDEX
        items.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return items


def collate(batch: Sequence[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of items to the longest one: ``input_ids`` with ``pad_token_id``,
    ``attention_mask`` with 0 and ``labels`` (if present) with -100. Returns ``[B, T]`` tensors."""
    if not batch:
        raise user_error("cannot collate an empty batch", 0, "pass at least one item")
    if pad_token_id is None:
        raise user_error("collate needs a pad_token_id", None, "set tokenizer.pad_token (e.g. to eos)")
    width = max(int(item["input_ids"].shape[-1]) for item in batch)
    fill = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    out: dict[str, torch.Tensor] = {}
    for key, value in fill.items():
        if key not in batch[0]:
            continue
        rows = torch.full((len(batch), width), value, dtype=torch.long)
        for r, item in enumerate(batch):
            t = item[key]
            rows[r, : t.shape[-1]] = t
        out[key] = rows
    return out


# --------------------------------------------------------------------------------------------------
# Log-likelihood evaluation
# --------------------------------------------------------------------------------------------------


def _model_device(model: Any) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _accepts_logits_to_keep(model: Any) -> bool:
    """Whether the (unwrapped) model's forward takes ``logits_to_keep`` (recent HF causal LMs do)."""
    get_base = getattr(model, "get_base_model", None)  # PEFT wrappers forward kwargs to the base model
    base = get_base() if callable(get_base) else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError, AttributeError):
        return False


def score_choices(
    model: Any,
    tokenizer: Any,
    examples: Sequence[ChoiceExample],
    batch_size: int = 16,
    max_length: int = 256,
    normalize: bool = False,
    progress: bool = False,
) -> list[list[float]]:
    """Log-likelihood of every choice of every example: ``scores[i][j] = sum log p(choice_j tokens |
    prompt_i)`` (divided by the number of choice tokens when ``normalize``).

    All (example, choice) pairs are tokenised as ``ids(prompt) + ids(" " + choice)``, sorted by length,
    right-padded and scored ``batch_size`` pairs per forward pass under ``torch.inference_mode`` with the
    model in eval mode (its previous training mode is restored afterwards). Works with any Hugging Face
    causal LM whose forward takes ``input_ids`` / ``attention_mask`` and returns ``logits`` (PEFT-wrapped
    models included). Over-long pairs are cut to ``max_length`` like :func:`build_train_dataset`.
    """
    if batch_size < 1:
        raise user_error("batch_size must be >= 1", batch_size, "pass a positive batch_size")
    if not examples:
        return []
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_token_id", None)
    if pad_id is None:
        pad_id = 0  # padded positions are masked and never scored; any valid id works

    owners: list[tuple[int, int]] = [(i, j) for i, e in enumerate(examples) for j in range(len(e.choices))]
    prompts_ids, conts_ids = _encode_pairs(
        tokenizer,
        [examples[i].prompt for i, _ in owners],
        [_continuation(examples[i].choices[j]) for i, j in owners],
    )
    keep_first = bool(_bos_prefix(tokenizer))
    seqs: list[tuple[list[int], int]] = []  # (ids, number of continuation tokens)
    for p_ids, c_ids in zip(prompts_ids, conts_ids, strict=True):
        if not c_ids:
            raise user_error("a choice tokenises to zero tokens", c_ids, "use non-empty choice strings")
        p_ids, c_ids = _fit(p_ids, c_ids, max_length, keep_first)
        if not p_ids:
            raise user_error("a prompt tokenises to zero tokens", "", "use non-empty prompts")
        seqs.append((p_ids + c_ids, len(c_ids)))

    order = sorted(range(len(seqs)), key=lambda k: -len(seqs[k][0]))
    pair_scores = [0.0] * len(seqs)
    device = _model_device(model)
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    iterator: Iterable[list[int]] = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc="scoring choices", unit="batch")

    slim = _accepts_logits_to_keep(model)
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        with torch.inference_mode():
            for idx in iterator:
                width = len(seqs[idx[0]][0])
                input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
                attention_mask = torch.zeros((len(idx), width), dtype=torch.long)
                rows: list[int] = []
                positions: list[int] = []
                targets: list[int] = []
                for r, k in enumerate(idx):
                    ids, n_cont = seqs[k]
                    input_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                    attention_mask[r, : len(ids)] = 1
                    start = len(ids) - n_cont
                    rows.extend([r] * n_cont)
                    positions.extend(range(start - 1, len(ids) - 1))
                    targets.extend(ids[start:])
                kwargs: dict[str, Any] = {}
                lo = min(positions)
                if slim:  # project onto the vocabulary only where a choice token is predicted
                    kwargs["logits_to_keep"] = torch.arange(lo, width - 1, device=device)
                out = model(
                    input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kwargs
                )
                logits = out.logits if hasattr(out, "logits") else out[0]
                if logits.shape[1] == width:
                    offset = 0
                elif logits.shape[1] == width - 1 - lo:
                    offset = lo
                else:
                    raise RuntimeError(
                        f"unexpected logits shape {tuple(logits.shape)} for a batch of width {width}"
                    )
                pos = torch.tensor(positions, device=logits.device) - offset
                picked = logits[torch.tensor(rows, device=logits.device), pos]
                logp = torch.log_softmax(picked.float(), dim=-1)
                tok_lp = logp.gather(-1, torch.tensor(targets, device=logp.device).unsqueeze(-1)).squeeze(-1)
                per_row = torch.zeros(len(idx), dtype=torch.float64, device=tok_lp.device)
                per_row.index_add_(0, torch.tensor(rows, device=tok_lp.device), tok_lp.double())
                for r, k in enumerate(idx):
                    total = float(per_row[r])
                    pair_scores[k] = total / seqs[k][1] if normalize else total
    finally:
        model.train(was_training)

    scores: list[list[float]] = [[0.0] * len(e.choices) for e in examples]
    for k, (i, j) in enumerate(owners):
        scores[i][j] = pair_scores[k]
    return scores


def evaluate_choices(
    model: Any,
    tokenizer: Any,
    examples: Sequence[ChoiceExample],
    batch_size: int = 16,
    max_length: int = 256,
    normalize: bool = False,
    progress: bool = False,
) -> float:
    """Accuracy in [0, 1] of log-likelihood multiple-choice scoring (see :func:`score_choices`).

    The prediction for an example is the argmax of its choice scores (first one on ties).
    """
    if not examples:
        raise user_error("cannot evaluate on zero examples", 0, "pass a non-empty list of examples")
    scores = score_choices(model, tokenizer, examples, batch_size, max_length, normalize, progress)
    correct = sum(int(_argmax(s) == e.label) for s, e in zip(scores, examples, strict=True))
    return correct / len(examples)


def predict_choices(scores: Sequence[Sequence[float]]) -> list[int]:
    """Index of the best choice per example for scores from :func:`score_choices` (first on ties)."""
    return [_argmax(s) for s in scores]


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)
