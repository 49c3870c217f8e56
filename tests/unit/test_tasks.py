"""Unit tests for launch/tasks.py (the demo and benchmark task data): loading the real task files, splits, training items, scoring.

No pretrained model: scoring is checked on a tiny random Llama with a character-level tokenizer.
"""

from __future__ import annotations

import json
import math
import string
from pathlib import Path

import pytest
import torch

from launch.tasks import (
    IGNORE_INDEX,
    ChoiceExample,
    build_train_dataset,
    collate,
    evaluate_choices,
    load_task,
    predict_choices,
    score_choices,
    split_task,
)

DATA = Path(__file__).resolve().parents[2] / "data"
BIGBENCH = DATA / "bigbench"
PIQA = DATA / "piqa"

needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"task data folder {DATA} not present")


# --------------------------------------------------------------------------------------------------
# Tiny offline tokenizer + model
# --------------------------------------------------------------------------------------------------


def make_char_tokenizer(add_bos: bool = False):
    """A character-level PreTrainedTokenizerFast (every character is one token)."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<s>", "</s>"]
    chars = sorted(set(string.printable) - set("\x0b\x0c"))
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()  # decode without separators
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def make_tiny_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    # larger weights than the default init so choice scores are well separated
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def tok():
    return make_char_tokenizer()


@pytest.fixture(scope="module")
def tiny(tok):
    return make_tiny_llama(len(tok))


TOY = [
    ChoiceExample("Q: sky color?\nAnswer:", ("blue", "green", "a very long red"), 0),
    ChoiceExample("Q: 2+2?\nAnswer:", ("4", "five"), 1),
    ChoiceExample("Short\nAnswer:", ("yes", "no"), 0),
    ChoiceExample("A much longer prompt that goes on for a while.\nAnswer:", ("x", "yy", "zzz", "w"), 2),
    ChoiceExample("Pick:\nAnswer:", ("left hand side", "right"), 1),
]


def naive_scores(model, tokenizer, examples, normalize=False):
    """One forward per (example, choice): sum of log-softmax over the choice tokens."""
    bos = [tokenizer.bos_token_id] if tokenizer("")["input_ids"][:1] == [tokenizer.bos_token_id] else []
    out = []
    with torch.no_grad():
        for ex in examples:
            p = bos + tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
            row = []
            for choice in ex.choices:
                c = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
                ids = torch.tensor([p + c])
                logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
                s = sum(float(logp[len(p) + t - 1, c[t]]) for t in range(len(c)))
                row.append(s / len(c) if normalize else s)
            out.append(row)
    return out


# --------------------------------------------------------------------------------------------------
# load_task on the real files
# --------------------------------------------------------------------------------------------------


@needs_data
@pytest.mark.parametrize(
    "name,count,n_choices",
    [
        ("intent_recognition.json", 693, 7),
        ("social_iqa.json", 1954, 3),
        ("multiemo__medicine_text_en.json", 3272, 4),
    ],
)
def test_load_bigbench_real(name, count, n_choices):
    path = BIGBENCH / name
    examples = load_task(path)
    assert len(examples) == count
    raw = json.loads(path.read_text(encoding="utf-8"))["examples"]
    for ex, r in zip(examples, raw, strict=True):
        assert 2 <= len(ex.choices) <= n_choices  # social_iqa has 4 items with only 2 choices in the file
        assert ex.choices == tuple(c.strip() for c in r["target_scores"])  # file order kept
        assert r["target_scores"][list(r["target_scores"])[ex.label]] == 1
        assert r["input"].strip() in ex.prompt
        assert not ex.prompt.endswith(" ")
    assert sum(len(e.choices) < n_choices for e in examples) == (4 if name == "social_iqa.json" else 0)
    assert load_task(str(path)) == examples  # deterministic, str path accepted


@needs_data
def test_bigbench_prompt_templates():
    intent = load_task(BIGBENCH / "intent_recognition.json")[0]
    assert intent.prompt.startswith("Predict the intent of the utterance.")
    assert intent.prompt.endswith(
        "\nUtterance: Add Sabrina Salerno to the grime instrumentals playlist.\nIntent:"
    )
    assert intent.answer == "add_to_playlist"
    siqa = load_task(BIGBENCH / "social_iqa.json")[0]
    assert siqa.prompt == (
        "Tracy didn't go home that evening and resisted Riley's attacks. What does Tracy need to do before this?"
        "\nAnswer:"
    )
    assert siqa.answer == "Find somewhere to go"
    emo = load_task(BIGBENCH / "multiemo__medicine_text_en.json")[0]
    assert emo.prompt.startswith(
        "Determine whether given opinion is positive, negative, neutral or ambivalent"
    )
    assert emo.prompt.endswith("\nAnswer:")
    assert emo.choices == ("ambivalent", "positive", "negative", "neutral") and emo.answer == "positive"


@needs_data
def test_load_piqa_real():
    examples = load_task(PIQA)
    assert len(examples) == 1838
    assert load_task(PIQA / "valid.jsonl") == examples
    first = examples[0]
    assert first.prompt == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert first.choices[0].startswith(
        "Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper"
    )
    assert first.label == 0
    labels = [e.label for e in examples]
    assert labels.count(0) == 910 and labels.count(1) == 928
    assert all(c == c.strip() and c for e in examples for c in e.choices)


def _err(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg.startswith("gradpruner:")
    assert "Fix:" in msg
    return msg


def test_load_task_errors(tmp_path):
    with pytest.raises(ValueError) as ei:
        load_task(tmp_path / "missing.json")
    assert "missing.json" in _err(ei)

    other = tmp_path / "task.csv"
    other.write_text("a,b\n")
    with pytest.raises(ValueError) as ei:
        load_task(other)
    assert "task.csv" in _err(ei)

    with pytest.raises(ValueError) as ei:
        load_task(tmp_path)  # folder without valid.jsonl
    assert str(tmp_path) in _err(ei)

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError) as ei:
        load_task(bad)
    assert "bad.json" in _err(ei)

    two = tmp_path / "two.json"
    two.write_text(json.dumps({"examples": [{"input": "q", "target_scores": {"a": 1, "b": 1}}]}))
    with pytest.raises(ValueError) as ei:
        load_task(two)
    assert "two.json" in _err(ei) and "exactly one" in str(ei.value)

    gen = tmp_path / "gen.json"
    gen.write_text(json.dumps({"examples": [{"input": "q", "target": "a"}]}))
    with pytest.raises(ValueError) as ei:
        load_task(gen)
    assert "gen.json" in _err(ei)

    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "valid.jsonl").write_text(json.dumps({"goal": "g", "sol1": "a", "sol2": "b"}) + "\n")
    with pytest.raises(ValueError) as ei:
        load_task(tmp_path / "p")
    assert "valid-labels.lst" in _err(ei)
    (tmp_path / "p" / "valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(ValueError) as ei:
        load_task(tmp_path / "p")
    assert "not aligned" in _err(ei)
    (tmp_path / "p" / "valid-labels.lst").write_text("1\n")
    assert load_task(tmp_path / "p") == [ChoiceExample("Question: g\nAnswer:", ("a", "b"), 1)]


def test_choice_example_validation():
    with pytest.raises(ValueError, match="^gradpruner:"):
        ChoiceExample("p", ("a", "b"), 2)
    with pytest.raises(ValueError, match="^gradpruner:"):
        ChoiceExample("p", ("a",), 0)


# --------------------------------------------------------------------------------------------------
# split_task
# --------------------------------------------------------------------------------------------------


def _synthetic(n: int) -> list[ChoiceExample]:
    return [ChoiceExample(f"q{i}\nAnswer:", (f"a{i}", f"b{i}"), i % 2) for i in range(n)]


def test_split_sizes_determinism_disjoint():
    ex = _synthetic(100)
    s = split_task(ex, seed=3, val_fraction=0.1, test_fraction=0.2)
    assert (len(s.train), len(s.val), len(s.test)) == (70, 10, 20)
    assert split_task(ex, seed=3) == s
    assert split_task(list(ex), seed=4) != s
    keys = [{e.key() for e in part} for part in (s.train, s.val, s.test)]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    assert set().union(*keys) == {e.key() for e in ex}
    # documented rule: a random.Random(seed) permutation, test first, then val
    import random

    order = list(range(100))
    random.Random(3).shuffle(order)
    assert s.test == [ex[i] for i in order[:20]]
    assert s.val == [ex[i] for i in order[20:30]]


def test_split_max_test_and_errors():
    ex = _synthetic(50)
    s = split_task(ex, seed=0, max_test=4)
    assert (len(s.train), len(s.val), len(s.test)) == (41, 5, 4)
    with pytest.raises(ValueError, match="^gradpruner:"):
        split_task(ex, val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match="^gradpruner:"):
        split_task(ex, test_fraction=-0.1)
    with pytest.raises(ValueError, match="^gradpruner:"):
        split_task([])
    with pytest.raises(ValueError, match="^gradpruner:"):
        split_task(_synthetic(2))


def test_split_drops_duplicates_of_test_items():
    base = _synthetic(40)
    dup = ChoiceExample("q0\nAnswer:", ("b0", "a0"), 1)  # same prompt + choice set, other order/label
    ex = base + [base[i] for i in range(40)] + [dup]
    for seed in range(5):
        s = split_task(ex, seed=seed)
        test_keys = {e.key() for e in s.test}
        val_keys = {e.key() for e in s.val}
        assert not any(e.key() in test_keys for e in s.train + s.val)
        assert not any(e.key() in val_keys for e in s.train)
        assert len(s.test) == round(len(ex) * 0.2)


@needs_data
def test_split_social_iqa_has_no_leak():
    ex = load_task(BIGBENCH / "social_iqa.json")
    s = split_task(ex, seed=0)
    assert len(s.test) == round(len(ex) * 0.2)
    test_keys = {e.key() for e in s.test}
    assert not any(e.key() in test_keys for e in s.train + s.val)
    assert len(s.train) + len(s.val) + len(s.test) <= len(ex)
    assert len(s.train) + len(s.val) + len(s.test) >= len(ex) - 24  # at most the 24 duplicate items


# --------------------------------------------------------------------------------------------------
# build_train_dataset / collate
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("add_bos", [False, True])
def test_build_train_dataset(add_bos):
    tk = make_char_tokenizer(add_bos=add_bos)
    items = build_train_dataset(tk, TOY, max_length=256)
    assert len(items) == len(TOY)
    for item, ex in zip(items, TOY, strict=True):
        ids, labels, mask = item["input_ids"], item["labels"], item["attention_mask"]
        assert ids.dtype == torch.long and ids.shape == labels.shape == mask.shape
        assert bool((mask == 1).all())
        n_prompt = len(ex.prompt) + (1 if add_bos else 0)  # character-level tokenizer
        expected_text = ex.prompt + " " + ex.answer
        assert tk.decode(ids[:-1], skip_special_tokens=True) == expected_text
        assert int(ids[-1]) == tk.eos_token_id
        assert (int(ids[0]) == tk.bos_token_id) == add_bos
        assert bool((labels[:n_prompt] == IGNORE_INDEX).all())
        assert torch.equal(labels[n_prompt:], ids[n_prompt:])
        assert tk.decode(labels[n_prompt:-1]) == " " + ex.answer


def test_build_train_dataset_truncates_prompt_from_left():
    tk = make_char_tokenizer(add_bos=True)
    ex = ChoiceExample("0123456789abcdefghij\nAnswer:", ("yes", "no"), 0)
    (item,) = build_train_dataset(tk, [ex], max_length=12)
    ids, labels = item["input_ids"], item["labels"]
    assert ids.shape[0] == 12
    assert int(ids[0]) == tk.bos_token_id  # BOS kept
    assert tk.decode(ids[1:], skip_special_tokens=True) == "nswer: yes"
    assert tk.decode(labels[labels != IGNORE_INDEX], skip_special_tokens=True) == " yes"
    assert int((labels != IGNORE_INDEX).sum()) == 5  # " yes" + eos


def test_collate_pads_right(tok):
    items = build_train_dataset(tok, TOY)
    batch = collate(items, pad_token_id=tok.pad_token_id)
    width = max(len(i["input_ids"]) for i in items)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for key in batch:
        assert batch[key].shape == (len(items), width) and batch[key].dtype == torch.long
    for r, item in enumerate(items):
        n = len(item["input_ids"])
        assert torch.equal(batch["input_ids"][r, :n], item["input_ids"])
        assert bool((batch["input_ids"][r, n:] == tok.pad_token_id).all())
        assert int(batch["attention_mask"][r].sum()) == n
        assert bool((batch["labels"][r, n:] == IGNORE_INDEX).all())
    with pytest.raises(ValueError, match="^gradpruner:"):
        collate([], pad_token_id=0)


def test_training_loss_only_on_answer(tok, tiny):
    items = build_train_dataset(tok, TOY)
    batch = collate(items, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        loss = tiny(**batch).loss
        logits = tiny(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shift_logits, shift_labels = logits[:, :-1], batch["labels"][:, 1:]
    keep = shift_labels != IGNORE_INDEX
    manual = torch.nn.functional.cross_entropy(shift_logits[keep], shift_labels[keep])
    assert math.isfinite(float(loss))
    assert torch.allclose(loss, manual, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# evaluate_choices / score_choices
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("add_bos", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_scores_match_naive(add_bos, normalize):
    tk = make_char_tokenizer(add_bos=add_bos)
    model = make_tiny_llama(len(tk), seed=1)
    fast = score_choices(model, tk, TOY, batch_size=3, normalize=normalize)
    slow = naive_scores(model, tk, TOY, normalize=normalize)
    for f_row, s_row in zip(fast, slow, strict=True):
        assert f_row == pytest.approx(s_row, abs=1e-4)
    assert predict_choices(fast) == predict_choices(slow)
    acc = evaluate_choices(model, tk, TOY, batch_size=3, normalize=normalize)
    expected = sum(p == e.label for p, e in zip(predict_choices(slow), TOY, strict=True)) / len(TOY)
    assert acc == pytest.approx(expected)
    assert 0.0 <= acc <= 1.0


def test_hand_checkable_accuracy(tok, tiny):
    """Relabel each toy example with the naive argmax: accuracy must be exactly 1, then 0 when shifted."""
    preds = predict_choices(naive_scores(tiny, tok, TOY))
    right = [ChoiceExample(e.prompt, e.choices, p) for e, p in zip(TOY, preds, strict=True)]
    wrong = [
        ChoiceExample(e.prompt, e.choices, (p + 1) % len(e.choices)) for e, p in zip(TOY, preds, strict=True)
    ]
    assert evaluate_choices(tiny, tok, right) == 1.0
    assert evaluate_choices(tiny, tok, wrong) == 0.0
    assert evaluate_choices(tiny, tok, right[:2] + wrong[2:]) == pytest.approx(2 / 5)


def test_scores_independent_of_batch_size(tok, tiny):
    a = score_choices(tiny, tok, TOY, batch_size=1)
    b = score_choices(tiny, tok, TOY, batch_size=64)
    for ra, rb in zip(a, b, strict=True):
        assert ra == pytest.approx(rb, abs=1e-4)


def test_scores_without_logits_to_keep(tok, tiny):
    """A model whose forward lacks ``logits_to_keep`` is scored through full logits, same result."""

    class Plain(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    a = score_choices(Plain(tiny), tok, TOY)
    b = score_choices(tiny, tok, TOY)
    for ra, rb in zip(a, b, strict=True):
        assert ra == pytest.approx(rb, abs=1e-5)


def test_logits_to_keep_used_when_supported(tok, tiny, monkeypatch):
    seen: list[object] = []
    original = tiny.forward

    def spy(input_ids=None, attention_mask=None, logits_to_keep=0):
        seen.append(logits_to_keep)
        return original(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep)

    monkeypatch.setattr(tiny, "forward", spy)
    score_choices(tiny, tok, TOY, batch_size=4)
    assert seen and all(isinstance(k, torch.Tensor) and k.dim() == 1 for k in seen)


def test_evaluate_restores_training_mode(tok, tiny):
    tiny.train()
    try:
        evaluate_choices(tiny, tok, TOY)
        assert tiny.training
    finally:
        tiny.eval()
    evaluate_choices(tiny, tok, TOY)
    assert not tiny.training


def test_evaluate_truncated_inputs(tok, tiny):
    """Over-long pairs lose prompt tokens from the left so that prompt + choice fits max_length."""
    prompt = "x" * 300 + "\nAnswer:"
    scores = score_choices(tiny, tok, [ChoiceExample(prompt, ("yes", "no"), 0)], max_length=32)
    # character-level tokenizer: " yes" is 4 tokens (28 prompt tokens left), " no" is 3 (29 left)
    yes = naive_scores(tiny, tok, [ChoiceExample(prompt[-28:], ("yes", "no"), 0)])[0][0]
    no = naive_scores(tiny, tok, [ChoiceExample(prompt[-29:], ("yes", "no"), 0)])[0][1]
    assert scores[0] == pytest.approx([yes, no], abs=1e-4)


def test_evaluate_peft_wrapped(tok):
    peft = pytest.importorskip("peft")
    model = make_tiny_llama(len(tok), seed=2)
    reference = score_choices(model, tok, TOY)
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    wrapped = peft.get_peft_model(model, cfg)  # LoRA B is zero at init: same function
    got = score_choices(wrapped, tok, TOY)
    for ra, rb in zip(got, reference, strict=True):
        assert ra == pytest.approx(rb, abs=1e-5)
    assert 0.0 <= evaluate_choices(wrapped, tok, TOY, progress=True) <= 1.0


def test_evaluate_errors(tok, tiny):
    with pytest.raises(ValueError, match="^gradpruner:"):
        evaluate_choices(tiny, tok, [])
    with pytest.raises(ValueError, match="^gradpruner:"):
        evaluate_choices(tiny, tok, TOY, batch_size=0)
