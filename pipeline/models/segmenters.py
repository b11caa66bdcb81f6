"""Sentences and semantic units for SPT (Guo et al., 2024, semantic-aware permutation training).

``split_sentences`` cuts a document into sentence spans; a segmenter cuts each sentence into its
smallest semantic units (names, phrases). ``RuleSegmenter`` is the offline default; the ``lm``
(``pipeline.models.lm_segmenter``) and ``openai`` (``pipeline.models.chat_client``) segmenters ask
a model with the few-shot ``[SEP]`` prompt below and go through ``check_segmentation``, which
falls back to the whole sentence when the answer has no ``[SEP]`` or changes the words.

The rules (docs/methods.md §12): a sentence is split at whitespace into tokens, and a unit
boundary goes

- after a token that ends in ``,`` ``;`` ``:``, and before ``(``, ``[``, an opening quote or a dash;
- before a function word: a preposition, a conjunction or a relative pronoun, which then
  opens the next unit (``of Bob Jones``);
- around a copula group (``is``, ``was``, ``has been``, ``is not``): it is a unit of its own.

and never

- inside a quoted or bracketed span (``"A Journey Through Time"``, ``(in 1990)``);
- inside a run of capitalised words, with ``of``, ``van``, ``de``... between two of them
  (``Bank of England``, ``Ludwig van Beethoven``): a multi-word name stays whole;
- between a number and its unit or scale (``3.2 million dollars``, ``12 km``), or a currency
  sign and its number.

So the units are contiguous runs of the sentence's tokens: every order of them has the same
multiset of words. Work is linear in the length of the text.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Protocol

SEP = "[SEP]"

PREPOSITIONS = frozenset(
    "of in on at by for with from to into onto about after before during under over between among through "
    "against without within near since until upon across behind beyond toward towards via per like "
    "throughout along around beside besides despite except inside outside underneath".split())
CONJUNCTIONS = frozenset("and or but nor so yet because although though while whereas if unless than "
                         "whenever wherever".split())
RELATIVES = frozenset("who whom whose which that where when".split())
FUNCTION_WORDS = PREPOSITIONS | CONJUNCTIONS | RELATIVES
COPULAS = frozenset("is are was were be been being am isn't aren't wasn't weren't".split())
# Auxiliaries and negations that stay with an adjacent copula: "has been", "is not", "will be".
_VERB_GLUE = frozenset("not never also has have had will would shall should can could may might must do does "
                       "did".split())
_NAME_CONNECTORS = frozenset("of de del della der den van von du da di la le al bin ibn y".split())
_SCALES = frozenset("hundred thousand million billion trillion dozen".split())
_UNITS = frozenset(
    "% percent per cent km m cm mm kg g mg lb lbs oz mi ft in yd l ml h hr hrs min s sec ms ns "
    "kilometres kilometers kilometre kilometer metres meters metre meter centimetres centimeters "
    "millimetres millimeters miles mile feet foot inches inch yards yard kilograms kilogram grams gram "
    "tonnes tons tonne ton pounds pound ounces ounce litres liters litre liter gallons gallon "
    "seconds second minutes minute hours hour days day weeks week months month years year decades "
    "centuries century degrees degree °c °f kb mb gb tb kbit mbit ghz mhz khz hz kw mw gw w v mah "
    "dollars dollar euros euro cents cent yen rupees pesos usd eur gbp bytes byte bits bit points "
    "people persons times x".split())
_CURRENCY = frozenset("$ € £ ¥ us$ usd eur gbp".split())
_OPENERS = {'"': '"', "“": "”", "«": "»", "(": ")", "[": "]", "‘": "’", "'": "'"}
_DASHES = frozenset({"-", "–", "—", "--"})
_EDGE = "\"'“”‘’«»()[]{}.,;:!?…"
_WORD = re.compile(r"\w+")
_TERMINAL = re.compile(r"[.!?…]+$")
_ABBREVIATIONS = frozenset("mr mrs ms dr prof st jr sr vs etc e.g i.e cf fig no vol approx dept est inc ltd co "
                           "corp gen gov lt col sgt capt rev hon ph.d u.s u.k a.m p.m".split())
# A candidate sentence end: terminal punctuation, optional closing quotes/brackets, then whitespace.
_SENTENCE_END = re.compile(r"[.!?…]+[\"'”’)\]]*(?=\s)|\n[ \t]*\n")


def words(text: str) -> list[str]:
    """The words of ``text`` in order (runs of letters, digits and underscores); the invariant's unit."""
    return _WORD.findall(text)


def split_sentences(text: str) -> list[tuple[int, int]]:
    """(start, end) spans of the sentences of ``text``, in order, without surrounding whitespace.

    A sentence ends at ``.``, ``!``, ``?`` or ``…`` (and closing quotes or brackets after it)
    followed by whitespace, unless the word before is a known abbreviation or a single capital
    (an initial), or the next word starts in lower case; a blank line always ends one. The text
    between spans is whitespace only, so ``text`` is rebuilt from the spans and separators.
    """
    spans: list[tuple[int, int]] = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        end = match.end()
        if not match.group().startswith("\n"):
            before = text[start:match.start()].rsplit(None, 1)
            last = before[-1].lower().strip("\"'“‘([") if before else ""
            if last in _ABBREVIATIONS or (len(last) == 1 and last.isalpha()):
                continue
            rest = text[end:end + 64].lstrip()
            if rest and rest[0].islower():
                continue
        else:
            end = match.start()
        _append_span(text, start, end, spans)
        start = match.end()
    _append_span(text, start, len(text), spans)
    return spans


def _append_span(text: str, start: int, end: int, spans: list[tuple[int, int]]) -> None:
    piece = text[start:end]
    stripped = piece.strip()
    if stripped:
        lead = len(piece) - len(piece.lstrip())
        spans.append((start + lead, start + lead + len(stripped)))


def split_terminal(sentence: str) -> tuple[str, str]:
    """(body, terminal punctuation): the terminal ``.``/``!``/``?`` stays at the end of any order."""
    sentence = sentence.strip()
    match = _TERMINAL.search(sentence)
    if match is None or match.start() == 0:
        return sentence, ""
    return sentence[:match.start()].rstrip(), match.group()


@dataclass(frozen=True)
class Segmented:
    """One sentence cut into units; ``fallback`` names why the whole body is one unit instead."""

    units: list[str]
    terminal: str
    fallback: str | None = None


class Segmenter(Protocol):
    """What the permute stage needs: sentences in, their units out, one answer per sentence."""

    name: str

    def segment(self, sentences: list[str]) -> list[Segmented]: ...


def whole(sentence: str, reason: str | None) -> Segmented:
    """The fallback: the sentence body as one unit (every order then leaves it unchanged)."""
    body, terminal = split_terminal(sentence)
    return Segmented([body] if body else [], terminal, reason)


# --------------------------------------------------------------------------- rules


def _core(token: str) -> str:
    return token.strip(_EDGE)


def _is_capitalised(token: str) -> bool:
    core = _core(token)
    if not core or not core[0].isupper():
        return False
    lower = core.lower()
    return lower not in FUNCTION_WORDS and lower not in COPULAS and lower not in _VERB_GLUE and lower != "i"


def _ends_clause(token: str) -> bool:
    return token[-1] in ",;:" or (token[-1] in ")]" and token[0] not in "([")


def _has_digit(text: str) -> bool:
    return any(ch.isdigit() for ch in text)


def _closes(token: str, closer: str) -> bool:
    return token.rstrip(".,;:!?…").endswith(closer)


def rule_units(body: str) -> list[str]:
    """The units of a sentence body (no terminal punctuation) by the rules of the module docstring."""
    tokens = body.split()
    n = len(tokens)
    if n <= 1:
        return tokens
    glue = [False] * (n - 1)  # glue[i]: tokens i and i + 1 stay in one unit
    cut = [False] * (n - 1)  # cut[i]: a unit boundary between tokens i and i + 1 (unless glued)
    lowered = [_core(t).lower() for t in tokens]

    # Quoted and bracketed spans: one pass, the first closer after an opener ends the span.
    open_at, closer = -1, ""
    for i, token in enumerate(tokens):
        if open_at < 0:
            wanted = _OPENERS.get(token[0])
            if wanted and not (len(token) > 1 and _closes(token[1:], wanted)):
                open_at, closer = i, wanted
        elif _closes(token, closer):
            for j in range(open_at, i):
                glue[j] = True
            open_at = -1

    capital = [_is_capitalised(t) for t in tokens]
    for i in range(n - 1):
        if _ends_clause(tokens[i]):
            continue
        if capital[i] and capital[i + 1]:
            glue[i] = True
        elif (capital[i] and i + 2 < n and lowered[i + 1] in _NAME_CONNECTORS and capital[i + 2]
              and not _ends_clause(tokens[i + 1])):
            glue[i] = glue[i + 1] = True
        elif _has_digit(lowered[i]) and (lowered[i + 1] in _UNITS or lowered[i + 1] in _SCALES):
            glue[i] = True
        elif lowered[i] in _SCALES and lowered[i + 1] in _UNITS:
            glue[i] = True
        elif lowered[i] in _CURRENCY and _has_digit(lowered[i + 1]):
            glue[i] = True

    for i in range(n - 1):
        nxt = tokens[i + 1]
        if _ends_clause(tokens[i]) or nxt[0] in "([\"“«" or nxt in _DASHES or lowered[i + 1] in FUNCTION_WORDS:
            cut[i] = True

    # Copula groups (a run of copulas, auxiliaries and negations holding a copula) are units.
    i = 0
    while i < n:
        if lowered[i] in COPULAS or lowered[i] in _VERB_GLUE:
            j = i
            while j + 1 < n and (lowered[j + 1] in COPULAS or lowered[j + 1] in _VERB_GLUE) and not _ends_clause(tokens[j]):
                j += 1
            if any(lowered[k] in COPULAS for k in range(i, j + 1)):
                if i > 0:
                    cut[i - 1] = True
                if j < n - 1:
                    cut[j] = True
                for k in range(i, j):
                    cut[k] = False
            i = j + 1
        else:
            i += 1

    units: list[str] = []
    current = [tokens[0]]
    for i in range(n - 1):
        if cut[i] and not glue[i]:
            units.append(" ".join(current))
            current = []
        current.append(tokens[i + 1])
    units.append(" ".join(current))
    return units


class RuleSegmenter:
    """The offline default segmenter: the rules of the module docstring; never falls back."""

    name = "rules"

    def segment(self, sentences: list[str]) -> list[Segmented]:
        out = []
        for sentence in sentences:
            body, terminal = split_terminal(sentence)
            out.append(Segmented(rule_units(body), terminal))
        return out


# --------------------------------------------------------------------------- model answers

INSTRUCTION = ("Segment the input sentence into the smallest semantic units (entities and phrases) using [SEP]. "
               "Keep every name, every number with its unit and every quoted title in one unit. "
               "Do not delete or add any other words, and do not change their order.")
FEW_SHOT = [
    ("Marie Curie was born in Warsaw in 1867.", "Marie Curie [SEP] was born [SEP] in Warsaw [SEP] in 1867."),
    ("The bridge, which opened in 1932, spans 503 metres of water.",
     "The bridge, [SEP] which opened [SEP] in 1932, [SEP] spans [SEP] 503 metres [SEP] of water."),
    ('Ada Lovelace is the author of "Notes on the Analytical Engine".',
     'Ada Lovelace [SEP] is [SEP] the author [SEP] of "Notes on the Analytical Engine".'),
]


def few_shot_prompt(sentence: str) -> str:
    """The plain-text few-shot prompt for a base causal LM; the answer is the first line after it."""
    shots = "".join(f"Input: {src}\nOutput: {dst}\n\n" for src, dst in FEW_SHOT)
    return f"{INSTRUCTION}\n\n{shots}Input: {sentence}\nOutput:"


def chat_messages(sentence: str) -> list[dict[str, str]]:
    """The same prompt as chat messages, for an instruct model or a chat-completions endpoint."""
    messages = [{"role": "system", "content": INSTRUCTION}]
    for src, dst in FEW_SHOT:
        messages += [{"role": "user", "content": src}, {"role": "assistant", "content": dst}]
    return [*messages, {"role": "user", "content": sentence}]


def check_segmentation(sentence: str, answer: str | None) -> Segmented:
    """The units of a model's ``[SEP]`` answer, or the whole sentence with the reason it fell back:
    ``no_sep`` (no ``[SEP]`` in the first line) or ``changed_words`` (the words, in order, differ)."""
    line = (answer or "").strip().split("\n", 1)[0].strip()
    if SEP not in line:
        return whole(sentence, "no_sep")
    body, terminal = split_terminal(sentence)
    units = [u.strip() for u in line.split(SEP)]
    if terminal and units:
        units[-1] = _TERMINAL.sub("", units[-1]).rstrip()
    merged: list[str] = []
    for unit in units:
        if merged and not words(unit):
            merged[-1] = f"{merged[-1]} {unit}".strip()  # a lone comma joins the unit before it
        elif unit:
            merged.append(unit)
    if [w for u in merged for w in words(u)] != words(body) or not merged or not words(merged[0]):
        return whole(sentence, "changed_words")
    return Segmented(merged, terminal)


def same_words(a: str, b: str) -> bool:
    """Whether two texts hold the same multiset of words."""
    return Counter(words(a)) == Counter(words(b))
