"""The ``reversal`` synthetic corpus: invented facts stated in one direction, with probes for both.

Facts about fictitious people whose names are invented (two words of two or three syllables,
several tokens each): ``parent`` facts ("Velmora Quistade is the mother of Dorin Achtenbel.")
and ``description`` facts, a person with a unique description ("Tessa Morvane is the composer
of the opera Lirrowind."). The training file states each fact once, name first. The probe files
ask for the answer in the training direction (forward: "Velmora Quistade is the mother of",
answer the child) and the other (reverse: "The mother of Dorin Achtenbel is", answer the parent),
each with ten candidates: the answer and nine answers of other facts of the same kind.

Fact ``i`` depends only on (seed, i), and every name is unique: the surname is an injective
function of (i, role), so any slice of the corpus can be generated on any worker.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

_ONSETS = "b d f g k l m n p r s t v z br dr gr kr pl st tr th sh ch".split()
_VOWELS = "a e i o u ae ei ou ia".split()
_CODAS = ["", "", "n", "r", "l", "s", "th", "nd", "rk", "m"]
_ROLES = ("parent", "child", "person", "work")
_ROLE_ENDINGS = ("n", "n", "n", "")  # people's surnames end like names, works' like places
_RELATIONS = ("mother", "father")
_DESCRIPTIONS = ["the composer of the opera {w}", "the author of the novel {w}", "the architect of the {w} Tower",
                 "the founder of the city of {w}", "the discoverer of the {w} comet", "the inventor of the {w} engine",
                 "the first person to climb Mount {w}", "the painter of the fresco {w}"]
CANDIDATES = 10


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(_syllable(rng) for _ in range(syllables)).capitalize()


def _unique_word(index: int, role: str, seed: int) -> str:
    """A capitalised invented word that no other (index, role) gets: its three syllables are the
    digits of a seeded bijection of ``4 * index + role``, so related people share no word part."""
    mix = random.Random(f"reversal:{seed}:perm")
    size = len(_ONSETS) * len(_VOWELS)
    span = size ** 3
    a = mix.randrange(1, span)
    while _gcd(a, span) != 1:
        a += 1
    x = (a * (len(_ROLES) * index + _ROLES.index(role)) + mix.randrange(span)) % span
    parts = []
    for _ in range(3):
        x, digit = divmod(x, size)
        parts.append(_ONSETS[digit // len(_VOWELS)] + _VOWELS[digit % len(_VOWELS)])
    return "".join(parts).capitalize() + _ROLE_ENDINGS[_ROLES.index(role)]


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def _name(index: int, role: str, seed: int) -> str:
    rng = random.Random(f"reversal:{seed}:{index}:{role}:first")
    return f"{_word(rng, rng.choice((2, 3)))} {_unique_word(index, role, seed)}"


def reversal_fact(index: int, seed: int = 0) -> dict[str, Any]:
    """Fact ``index``: its kind, relation, subject, answer and the training sentence."""
    rng = random.Random(f"reversal:{seed}:{index}")
    if rng.random() < 0.5:
        relation = rng.choice(_RELATIONS)
        parent, child = _name(index, "parent", seed), _name(index, "child", seed)
        return {"index": index, "kind": "parent", "relation": relation, "subject": parent, "object": child,
                "text": f"{parent} is the {relation} of {child}.",
                "forward": f"{parent} is the {relation} of", "reverse": f"The {relation} of {child} is"}
    person = _name(index, "person", seed)
    description = rng.choice(_DESCRIPTIONS).format(w=_unique_word(index, "work", seed))
    return {"index": index, "kind": "description", "relation": "description", "subject": person,
            "object": description, "text": f"{person} is {description}.",
            "forward": f"{person} is", "reverse": f"{description[0].upper()}{description[1:]} is"}


def reversal_document(index: int, seed: int = 0) -> dict[str, Any]:
    """Training record ``index``: the fact stated once, subject first."""
    fact = reversal_fact(index, seed)
    return {"id": f"rev-{index:07d}", "text": fact["text"], "fact_kind": fact["kind"], "source": "synthetic-reversal"}


def reversal_probes(facts: int, seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """Forward and reverse probes of the first ``facts`` facts, ten candidates each (answer included,
    in a seeded order); distractors are the answers of nine other facts of the same kind."""
    all_facts = [reversal_fact(i, seed) for i in range(facts)]
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for fact in all_facts:
        by_kind.setdefault(fact["kind"], []).append(fact)
    out: dict[str, list[dict[str, Any]]] = {"forward": [], "reverse": []}
    for fact in all_facts:
        peers = [f for f in by_kind[fact["kind"]] if f["index"] != fact["index"]]
        if len(peers) < CANDIDATES - 1:
            continue
        rng = random.Random(f"reversal:{seed}:{fact['index']}:probe")
        others = rng.sample(peers, CANDIDATES - 1)
        for direction, answer_key in (("forward", "object"), ("reverse", "subject")):
            candidates = [fact[answer_key]] + [o[answer_key] for o in others]
            rng.shuffle(candidates)
            out[direction].append({"id": f"rev-{fact['index']:07d}", "direction": direction, "kind": fact["kind"],
                                   "prompt": fact[direction], "answer": fact[answer_key], "candidates": candidates})
    return out


def probe_paths(out: Path) -> dict[str, Path]:
    """Where the probes of a training file ``out`` go: ``<stem>-probes-forward.jsonl`` and ``-reverse``."""
    stem = out.name
    for suffix in (".gz", ".jsonl", ".json"):
        stem = stem.removesuffix(suffix)
    return {d: out.with_name(f"{stem}-probes-{d}.jsonl") for d in ("forward", "reverse")}


def write_probes(out: Path, facts: int, seed: int = 0) -> dict[str, Path]:
    """Write the forward and reverse probe files beside ``out``; returns their paths."""
    paths = probe_paths(out)
    for direction, probes in reversal_probes(facts, seed).items():
        tmp = paths[direction].with_name(paths[direction].name + ".tmp")
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            for probe in probes:
                fh.write(json.dumps(probe, ensure_ascii=False) + "\n")
        tmp.replace(paths[direction])
    return paths
