"""Synthetic corpora with known ground truth.

``graded``: documents from ten topics, each with its own vocabulary, written clean from
templates and then degraded by an amount set by a hidden quality ``q`` in [0, 1]:

- character noise (typos) at a rate that grows with 1 - q;
- word shuffling inside sentences;
- repeated lines;
- boilerplate and markup junk lines;
- truncation mid-word.

Each record carries ``true_quality`` (= q), ``topic`` and the list of ``degradations``
applied, so scorers and curricula can be checked against the truth. Document ``i`` depends only
on (seed, i), so any slice of the corpus can be generated on any worker.
"""

from __future__ import annotations

import gzip
import io
import json
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

from pipeline.io.synth_reversal import reversal_document, write_probes

TOPICS: dict[str, dict[str, list[str]]] = {
    "astronomy": {
        "nouns": "star galaxy comet nebula telescope orbit planet moon asteroid quasar pulsar eclipse meteor "
        "observatory spectrum cluster horizon satellite supernova crater".split(),
        "verbs": "orbits emits reflects eclipses collapses rotates observes measures tracks illuminates".split(),
        "adjs": "distant bright faint stellar cosmic lunar orbital massive icy luminous".split(),
    },
    "cooking": {
        "nouns": "recipe onion garlic skillet oven sauce butter flour dough broth pepper basil knife pan "
        "marinade crust pastry stew spice vinegar".split(),
        "verbs": "simmers roasts chops whisks bakes seasons stirs braises kneads grills".split(),
        "adjs": "savory crisp tender golden fragrant spicy creamy fresh smoky tangy".split(),
    },
    "medicine": {
        "nouns": "patient symptom diagnosis clinic dose vaccine nurse fever infection therapy antibody surgeon "
        "prescription ward tissue artery pulse immunity lesion remedy".split(),
        "verbs": "treats diagnoses prescribes monitors heals examines relieves prevents injects stabilizes".split(),
        "adjs": "chronic acute clinical sterile viral cardiac oral routine severe benign".split(),
    },
    "law": {
        "nouns": "court judge statute contract plaintiff defendant verdict appeal tribunal clause witness "
        "attorney precedent jury testimony lawsuit ruling motion deed tenant".split(),
        "verbs": "rules appeals argues enforces drafts overturns testifies settles disputes certifies".split(),
        "adjs": "binding legal civil federal criminal lawful void formal judicial explicit".split(),
    },
    "sailing": {
        "nouns": "sail mast hull keel rudder harbor anchor tide compass deck crew mooring current gale "
        "jib buoy wake bow stern voyage".split(),
        "verbs": "tacks anchors navigates hoists steers drifts moors trims capsizes charts".split(),
        "adjs": "windward nautical coastal salty calm stormy leeward sturdy tidal brisk".split(),
    },
    "gardening": {
        "nouns": "seed soil compost tomato hedge tulip greenhouse shovel mulch root seedling orchard "
        "fertilizer trellis bulb weed vine blossom shrub meadow".split(),
        "verbs": "plants prunes waters sprouts blooms harvests digs fertilizes transplants weeds".split(),
        "adjs": "fertile leafy perennial shady sunny organic moist seasonal hardy lush".split(),
    },
    "computing": {
        "nouns": "compiler kernel thread cache server database query network packet algorithm processor "
        "memory register socket function variable module protocol bytecode scheduler".split(),
        "verbs": "compiles executes allocates caches parses schedules encrypts indexes serializes optimizes".split(),
        "adjs": "concurrent binary recursive volatile parallel virtual static dynamic secure distributed".split(),
    },
    "music": {
        "nouns": "melody chord rhythm violin orchestra tempo harmony symphony piano drummer chorus "
        "conductor octave ballad sonata scale lyric concert cello verse".split(),
        "verbs": "composes performs rehearses improvises tunes conducts harmonizes records sings plays".split(),
        "adjs": "melodic harmonic acoustic rhythmic orchestral minor major lyrical tuneful baroque".split(),
    },
    "finance": {
        "nouns": "market stock bond dividend portfolio investor interest loan budget revenue asset equity "
        "inflation currency ledger audit mortgage credit yield broker".split(),
        "verbs": "invests borrows audits hedges trades lends forecasts budgets diversifies reinvests".split(),
        "adjs": "fiscal volatile liquid quarterly monetary solvent bullish bearish profitable annual".split(),
    },
    "geology": {
        "nouns": "rock mineral fault volcano glacier sediment crystal basalt granite fossil magma erosion "
        "canyon quartz tectonic plate stratum lava boulder cavern".split(),
        "verbs": "erodes erupts deposits fractures crystallizes shifts melts compresses weathers uplifts".split(),
        "adjs": "volcanic sedimentary igneous ancient porous molten layered glacial rocky metamorphic".split(),
    },
}

_TEMPLATES = [
    "The {adj} {noun} {verb} the {noun2} near the {noun3}.",
    "Every {noun} {verb} a {adj} {noun2} when the {noun3} is {adj2}.",
    "A {adj} {noun} often {verb} the {adj2} {noun2}.",
    "In the {noun3}, the {noun} {verb} each {adj} {noun2} with care.",
    "Because the {noun} is {adj}, it {verb} the {noun2} before the {noun3}.",
    "Most experts agree that the {adj} {noun} {verb} the {noun2}.",
    "After the {noun2} {verb2} the {noun3}, the {adj} {noun} {verb} again.",
    "This {noun} {verb} the {noun2}, and that {adj2} {noun3} {verb2} it.",
]

_JUNK_LINES = [
    "Click here to subscribe to our newsletter!!!",
    "<div class='nav'><a href='/'>Home</a> | <a href='/about'>About</a> | Login</div>",
    "Copyright (c) 2024 All rights reserved. Terms | Privacy | Cookies",
    "&nbsp;&nbsp;&nbsp; <br/><br/> <span style='display:none'>ad</span>",
    "SHARE ON FACEBOOK | TWEET THIS | PIN IT | EMAIL",
    "We use cookies to improve your experience. Accept all cookies?",
    "[[advertisement]] BUY NOW 50% OFF limited offer >>> http://spam.example/deal",
    "| | | ||| --- ||| {{template}} | | |",
]

_NOISE_CHARS = "abcdefghijklmnopqrstuvwxyz#@%&*~^"


def _sentence(rng: random.Random, vocab: dict[str, list[str]]) -> str:
    template = rng.choice(_TEMPLATES)
    nouns = rng.sample(vocab["nouns"], 3)
    verbs = rng.sample(vocab["verbs"], 2)
    adjs = rng.sample(vocab["adjs"], 2)
    return template.format(
        noun=nouns[0], noun2=nouns[1], noun3=nouns[2], verb=verbs[0], verb2=verbs[1], adj=adjs[0], adj2=adjs[1]
    )


def _clean_document(rng: random.Random, vocab: dict[str, list[str]]) -> list[str]:
    """Lines of clean prose: 1-3 paragraphs of 3-6 sentences."""
    paragraphs = []
    for _ in range(rng.randint(1, 3)):
        paragraphs.append(" ".join(_sentence(rng, vocab) for _ in range(rng.randint(3, 6))))
    return paragraphs


def _char_noise(rng: random.Random, text: str, rate: float) -> str:
    out = []
    for ch in text:
        roll = rng.random()
        if roll < rate / 3:
            continue  # deletion
        if roll < 2 * rate / 3:
            out.append(rng.choice(_NOISE_CHARS))  # substitution
            continue
        out.append(ch)
        if roll < rate:
            out.append(rng.choice(_NOISE_CHARS))  # insertion
    return "".join(out)


def _shuffle_words(rng: random.Random, line: str, fraction: float) -> str:
    words = line.split(" ")
    n_swaps = int(round(fraction * len(words)))
    for _ in range(n_swaps):
        i, j = rng.randrange(len(words)), rng.randrange(len(words))
        words[i], words[j] = words[j], words[i]
    return " ".join(words)


def graded_document(index: int, seed: int = 0) -> dict:
    """Document ``index`` of the graded corpus for ``seed``: a dict with id, text and the truth."""
    rng = random.Random(f"graded:{seed}:{index}")
    topic = rng.choice(sorted(TOPICS))
    quality = rng.random()
    severity = 1.0 - quality
    lines = _clean_document(rng, TOPICS[topic])
    applied = []

    shuffle_fraction = 0.8 * severity
    if shuffle_fraction > 0.05:
        lines = [_shuffle_words(rng, line, shuffle_fraction) for line in lines]
        applied.append("word_shuffle")
    if rng.random() < severity * 0.6:
        repeat = lines[rng.randrange(len(lines))]
        lines.extend([repeat] * rng.randint(1, 1 + int(3 * severity)))
        applied.append("repeated_lines")
    if rng.random() < severity:
        for _ in range(1 + int(4 * severity)):
            lines.insert(rng.randrange(len(lines) + 1), rng.choice(_JUNK_LINES))
        applied.append("boilerplate")
    text = "\n".join(lines)
    noise_rate = 0.18 * severity**1.5
    if noise_rate > 0.005:
        text = _char_noise(rng, text, noise_rate)
        applied.append("char_noise")
    if rng.random() < severity * 0.7:
        cut = max(20, int(len(text) * (1.0 - 0.6 * severity * rng.random())))
        text = text[:cut]
        applied.append("truncation")
    return {
        "id": f"syn-{index:07d}",
        "text": text,
        "topic": topic,
        "true_quality": round(quality, 6),
        "degradations": ",".join(applied),
        "source": "synthetic",
    }


def graded_documents(start: int, stop: int, seed: int = 0) -> Iterator[dict]:
    for index in range(start, stop):
        yield graded_document(index, seed)


SYNTHETIC_KINDS = {"graded": graded_document, "reversal": reversal_document}  # kind -> document(index, seed)


def write_synthetic(out: Path, docs: int, seed: int = 0, kind: str = "graded") -> int:
    """Write ``docs`` records as JSON lines (gzip if the name ends in .gz). Returns the count.

    ``reversal`` also writes its probe files beside ``out`` (``pipeline.io.synth_reversal``);
    ``reasoning`` writes its held-out split beside it (``pipeline.io.synth_reasoning``)."""
    if kind == "reasoning":
        from pipeline.io.synth_reasoning import write_reasoning  # it imports write_jsonl from here

        return write_reasoning(out, docs, seed)[0]
    if kind not in SYNTHETIC_KINDS:
        raise ValueError(f"unknown synthetic kind {kind!r}")
    write_jsonl(out, (SYNTHETIC_KINDS[kind](index, seed) for index in range(docs)))
    if kind == "reversal":
        write_probes(out, docs, seed)
    return docs


def write_jsonl(out: Path, records: Iterable[dict]) -> None:
    """JSON lines to ``out`` (gzip if the name ends in .gz), written under a temporary name and renamed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as raw:
        # mtime=0 and no file name in the gzip header: the same arguments give the same bytes.
        binary = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") if out.name.endswith(".gz") else raw
        with io.TextIOWrapper(binary, encoding="utf-8", newline="\n") as fh:
            for record in records:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(out)
