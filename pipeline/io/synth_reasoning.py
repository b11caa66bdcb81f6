"""Synthetic multi-step arithmetic word problems in prompt/response form, with a held-out split.

A problem starts from a count of 1-12 and applies 2 or 3 additions or subtractions of 1-6 (the
count never goes below 0); the response works through one step per sentence, then states the
answer::

    prompt:   "Question: Mia has 7 shells. Mia finds 5 more. Then Mia gives away 3. How many shells
               does Mia have now?\\nAnswer:"
    response: " 7 + 5 = 12. 12 - 3 = 9. The answer is 9."

Each record has ``id``, ``prompt``, ``response``, ``text`` (prompt + response, so the plain-text
tools read it too), ``answer`` and ``steps``. The held-out split holds the problems whose
*arithmetic* (start and signed operands) hashes into the test bucket, so no test problem's
calculation occurs in training, whatever its wording. Everything is a function of the seed.
"""

from __future__ import annotations

import random
from pathlib import Path

from pipeline.core.hashing import uniform
from pipeline.io.synth import write_jsonl

TEST_SHARE = 0.1  # of the problem space (by arithmetic) reserved for the held-out split
_NAMES = "Mia Leo Ava Sam Zoe Max Ivy Tom Eli Ada Ben Kim Noa Ray Uma Jon".split()
_THINGS = "apples shells coins stamps marbles cards pens books stones beads".split()
_GAIN = ["finds {n} more", "gets {n} more", "buys {n} more", "is given {n} more"]
_LOSS = ["gives away {n}", "loses {n}", "sells {n}", "uses {n}"]
MIN_START, MAX_START, MAX_OPERAND = 1, 12, 6


def _problem(rng: random.Random) -> tuple[int, list[int]]:
    """(start, signed operands): 2 or 3 steps of +-1..MAX_OPERAND that never take the count below 0."""
    start = rng.randint(MIN_START, MAX_START)
    value, operands = start, []
    for _ in range(rng.choice((2, 3))):
        n = rng.randint(1, MAX_OPERAND)
        sign = -1 if n <= value and rng.random() < 0.5 else 1
        operands.append(sign * n)
        value += sign * n
    return start, operands


def _record(rng: random.Random, start: int, operands: list[int], record_id: str) -> dict:
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    sentences = [f"{name} has {start} {thing}."]
    for i, n in enumerate(operands):
        verb = rng.choice(_GAIN if n > 0 else _LOSS).format(n=abs(n))
        sentences.append(f"{'' if i == 0 else 'Then '}{name} {verb}.")
    prompt = f"Question: {' '.join(sentences)} How many {thing} does {name} have now?\nAnswer:"
    steps, value = [], start
    for n in operands:
        steps.append(f"{value} {'+' if n > 0 else '-'} {abs(n)} = {value + n}.")
        value += n
    response = f" {' '.join(steps)} The answer is {value}."
    return {"id": record_id, "prompt": prompt, "response": response, "text": prompt + response,
            "answer": value, "steps": len(operands), "source": "synthetic"}


def reasoning_problems(train_docs: int, test_docs: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, test) records. Candidates come from one seeded stream; each goes to the split its
    arithmetic hashes to, until both are full."""
    train: list[dict] = []
    test: list[dict] = []
    index = 0
    limit = 1000 * (train_docs + test_docs) + 1000
    while (len(train) < train_docs or len(test) < test_docs) and index < limit:
        rng = random.Random(f"reasoning:{seed}:{index}")
        index += 1
        start, operands = _problem(rng)
        key = f"{start}:{','.join(map(str, operands))}"
        held_out = float(uniform([key], seed, "reasoning.split")[0]) < TEST_SHARE
        split = test if held_out else train
        if len(split) >= (test_docs if held_out else train_docs):
            continue
        split.append(_record(rng, start, operands, f"{'test' if held_out else 'train'}-{len(split):07d}"))
    return train, test


def held_out_path(out: Path) -> Path:
    """Where the held-out split of ``out`` goes: ``NAME-test.jsonl`` (or ``.jsonl.gz``) beside it."""
    for suffix in (".jsonl.gz", ".jsonl", ".json.gz", ".json", ".gz"):
        if out.name.endswith(suffix):
            return out.with_name(out.name[: -len(suffix)] + "-test" + suffix)
    return out.with_name(out.name + "-test.jsonl")


def write_reasoning(out: Path, docs: int, seed: int = 0) -> tuple[int, Path, int]:
    """``docs`` training problems to ``out`` and ``max(1, docs // 10)`` held-out ones beside it.

    Returns (training count, test file, test count)."""
    train, test = reasoning_problems(docs, max(1, docs // 10), seed)
    test_file = held_out_path(out)
    write_jsonl(out, train)
    write_jsonl(test_file, test)
    return len(train), test_file, len(test)
