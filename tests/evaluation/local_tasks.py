"""Small local multiple-choice lm-eval tasks written by tests (JSON lines + a task YAML), and the
accuracies recomputed from log-likelihoods with plain ``transformers`` calls.

Shared by tests/evaluation (torch, ONNX Runtime) and .ci/test_vllm_ci.py (real vLLM): the same
items and the same independent computation wherever the model runs.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import torch

TASK = "dsnt_tiny_mc"


def write_task(
    d: Path,
    docs: list[dict],
    *,
    name: str = TASK,
    text: str = "{{question}}",
    delim: str = " ",
    hub: str | None = None,
) -> Path:
    """A local multiple-choice lm-eval task over ``docs`` ({question, choices, label}); with
    ``hub``, the same task reading the hub dataset of that name instead."""
    d.mkdir(parents=True, exist_ok=True)
    data = d / f"{name}.jsonl"
    data.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in docs), "utf-8")
    source = (
        f"dataset_path: {hub}\n"
        if hub
        else f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
    )
    (d / f"{name}.yaml").write_text(
        f"task: {name}\n" + source + "output_type: multiple_choice\n"
        "test_split: test\n"
        f"doc_to_text: {json.dumps(text)}\n"
        "doc_to_target: label\n"
        'doc_to_choice: "{{choices}}"\n'
        f"target_delimiter: {json.dumps(delim)}\n"
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 3.0\n",
        "utf-8",
    )
    return d


def word_docs(n: int, vocab: int, seed: int = 0) -> list[dict]:
    """``n`` items over the tiny word-level vocabulary (w4..w{vocab-1}); 2 to 4 choices of 1-4
    words, some with a non-ASCII word (an <unk> token) so characters and bytes differ."""
    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(f"w{rng.randrange(4, vocab)}" for _ in range(k))

    docs = []
    for _ in range(n):
        k = rng.randrange(2, 5)
        choices = [words(rng.randrange(1, 5)) for _ in range(k)]
        if rng.random() < 0.3:
            choices[rng.randrange(k)] += " é"
        docs.append(
            {"question": words(rng.randrange(2, 9)), "choices": choices, "label": rng.randrange(k)}
        )
    return docs


def direct_scores(model, tok, docs: list[dict], delim: str = " ") -> dict:
    """acc / acc_norm and their stderrs recomputed without lm-eval or the scorer under test."""

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    acc, acc_norm = [], []
    with torch.no_grad():
        for doc in docs:
            ctx = doc["question"]
            lls = []
            for choice in doc["choices"]:
                whole = ids(ctx + delim + choice)
                n_ctx = len(ids(ctx))
                x = torch.tensor([whole])
                logp = torch.log_softmax(model(input_ids=x).logits[0].double(), dim=-1)
                lls.append(sum(float(logp[t - 1, whole[t]]) for t in range(n_ctx, len(whole))))
            lengths = [len(c) for c in doc["choices"]]
            acc.append(float(max(range(len(lls)), key=lambda i: lls[i]) == doc["label"]))
            norm = [ll / n for ll, n in zip(lls, lengths, strict=True)]
            acc_norm.append(float(max(range(len(norm)), key=lambda i: norm[i]) == doc["label"]))

    def mean_se(v: list[float]) -> tuple[float, float]:
        m = sum(v) / len(v)
        return m, math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1) / len(v))

    return {"acc": mean_se(acc), "acc_norm": mean_se(acc_norm)}


#: a small general-knowledge multiple-choice task (question, right answer, wrong answers)
FACTS = [
    ("The capital of France is", "Paris", ["Rome", "Berlin", "Madrid"]),
    ("Water freezes at zero degrees", "Celsius", ["Fahrenheit", "Kelvin"]),
    ("The opposite of hot is", "cold", ["warm", "loud", "green"]),
    ("A week has seven", "days", ["months", "years", "hours"]),
    ("The sun rises in the", "east", ["west", "north", "south"]),
    ("Python is a programming", "language", ["snake", "café", "river"]),
    ("The largest planet in the solar system is", "Jupiter", ["Mars", "Venus", "Mercury"]),
    ("Bees make", "honey", ["milk", "silk", "glass"]),
    ("Two plus two equals", "four", ["five", "three", "ten"]),
    ("The color of grass is", "green", ["blue", "red", "purple"]),
    ("Ice is frozen", "water", ["sand", "iron", "wood"]),
    ("The first month of the year is", "January", ["March", "October", "June"]),
    ("A triangle has three", "sides", ["wheels", "legs", "colors"]),
    ("Fish live in", "water", ["trees", "deserts", "clouds"]),
    ("The Earth orbits the", "Sun", ["Moon", "Mars", "comet"]),
    ("People read books in a", "library", ["garage", "bakery", "stadium"]),
    ("The chemical symbol for gold is", "Au", ["Ag", "Fe", "Pb"]),
    ("Cows drink", "water", ["oil", "ink", "paint"]),
    ("A baby cat is called a", "kitten", ["puppy", "calf", "foal"]),
    ("The boiling point of water at sea level is 100 degrees", "Celsius", ["Kelvin", "Rankine"]),
    ("Shakespeare wrote", "Hamlet", ["Faust", "Don Quixote", "Ulysses"]),
    ("The tallest animal is the", "giraffe", ["mouse", "penguin", "snail"]),
    ("An apple is a kind of", "fruit", ["metal", "stone", "engine"]),
    ("We see with our", "eyes", ["ears", "knees", "elbows"]),
    ("Snow is usually", "white", ["black", "orange", "pink"]),
    ("The number after nine is", "ten", ["eight", "seven", "two"]),
    ("A doctor works in a", "hospital", ["volcano", "forest", "submarine"]),
    ("The Pacific is an", "ocean", ["island", "desert", "mountain"]),
    ("Birds can", "fly", ["swim backwards", "photosynthesize", "read"]),
    ("Night follows", "day", ["winter", "lunch", "Tuesday"]),
]


def facts_docs(seed: int = 7) -> list[dict]:
    """:data:`FACTS` as ``{question, choices, label}`` items, choices shuffled (seeded)."""
    rng = random.Random(seed)
    docs = []
    for question, right, wrong in FACTS:
        choices = [right, *wrong]
        rng.shuffle(choices)
        docs.append({"question": question, "choices": choices, "label": choices.index(right)})
    return docs


def mc_requests(docs: list[dict], delim: str = " ", fmt: str = "{}") -> list[tuple[str, str]]:
    """The (context, continuation) pairs lm-eval asks for on a multiple-choice task over ``docs``:
    per item and choice, ``(fmt.format(question), delim + choice)``."""
    return [(fmt.format(d["question"]), delim + c) for d in docs for c in d["choices"]]
