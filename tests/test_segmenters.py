"""SPT segmenters: the rules (word multiset, whole names, linear time), the model-answer check, the
``openai`` segmenter against a real chat-completions server on 127.0.0.1, and the ``lm`` segmenter
with a real tiny causal LM."""

from __future__ import annotations

import gzip
import json
import random
import secrets
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.engine.config import load_config
from pipeline.engine.runner import run_pipeline
from pipeline.models.chat_client import ChatClient, OpenAISegmenter, Secret
from pipeline.models.segmenters import (
    FUNCTION_WORDS,
    RuleSegmenter,
    check_segmentation,
    rule_units,
    split_sentences,
    split_terminal,
    words,
)
from stages.permute import permute_text
from tests.conftest import real_mix_path

NAMES = ["Velmora Quistade", "Ludwig van Beethoven", "Bank of England", "Dorin Achtenbel-Osk", "J. R. Tolkien",
         "Marta de la Cruz", "New South Wales"]
FILLER = ["the mother", "a small house", "quickly", "ran", "wrote", "the old garden", "every morning", "seven",
          "3.5 kg", "12 km", "$ 40 million", "(in 1990)", '"A Journey Through Time"', "the river,"]
LINKS = sorted(FUNCTION_WORDS) + ["is", "was", "has been", "is not"]


def _permuted_sentences(sentence: str, rng: random.Random) -> list[str]:
    body, terminal = split_terminal(sentence)
    units = rule_units(body)
    shuffled = list(units)
    rng.shuffle(shuffled)
    return [" ".join(order) + terminal for order in (units, units[::-1], shuffled)]


# --------------------------------------------------------------------------- rules


@pytest.fixture(scope="module")
def real_sentences() -> list[str]:
    sentences: list[str] = []
    with gzip.open(real_mix_path(), "rt", encoding="utf-8") as fh:
        for line in fh:
            text = json.loads(line)["text"]
            sentences.extend(text[a:b] for a, b in split_sentences(text))
            if len(sentences) > 20_000:
                break
    return sentences


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(index=st.integers(min_value=0), shuffle_seed=st.integers(0, 2**32 - 1))
def test_real_sentences_keep_their_words_in_every_order(real_sentences, index, shuffle_seed):
    sentence = real_sentences[index % len(real_sentences)]
    body, terminal = split_terminal(sentence)
    units = rule_units(body)
    assert " ".join(units) == " ".join(body.split())  # contiguous runs of the tokens, none lost
    for permuted in _permuted_sentences(sentence, random.Random(shuffle_seed)):
        assert Counter(words(permuted)) == Counter(words(sentence)), (sentence, permuted)


def test_every_real_sentence_keeps_its_words(real_sentences):
    rng = random.Random(0)
    for sentence in real_sentences[:5000]:
        for permuted in _permuted_sentences(sentence, rng):
            assert Counter(words(permuted)) == Counter(words(sentence))


@st.composite
def sentences_with_names(draw):
    parts, names = [], []
    for _ in range(draw(st.integers(2, 8))):
        kind = draw(st.sampled_from(["name", "filler", "link"]))
        if kind == "name":
            name = draw(st.sampled_from(NAMES))
            names.append(name)
            parts.append(name)
        else:
            parts.append(draw(st.sampled_from(FILLER if kind == "filler" else LINKS)))
    return " ".join(parts) + draw(st.sampled_from([".", "!", "?", ""])), names


@settings(max_examples=400, deadline=None)
@given(case=sentences_with_names(), shuffle_seed=st.integers(0, 2**32 - 1))
def test_generated_sentences_keep_names_whole_and_words_equal(case, shuffle_seed):
    sentence, names = case
    body, _ = split_terminal(sentence)
    units = rule_units(body)
    for name in names:
        # A name ends a token run of its own or sits inside one unit, never across two.
        assert any(name in unit for unit in units), (name, units)
    for permuted in _permuted_sentences(sentence, random.Random(shuffle_seed)):
        assert Counter(words(permuted)) == Counter(words(sentence))
        for name in names:
            assert permuted.count(name) >= 1


@pytest.mark.parametrize(("sentence", "units"), [
    ("Alice Smith is the mother of Bob Jones.", ["Alice Smith", "is", "the mother", "of Bob Jones"]),
    ("The bridge, which opened in 1932, spans 503 metres of water.",
     ["The bridge,", "which opened", "in 1932,", "spans 503 metres", "of water"]),
    ('Ada Lovelace wrote "Notes on the Analytical Engine" in London.',
     ["Ada Lovelace wrote", '"Notes on the Analytical Engine"', "in London"]),
    ("He paid 3.2 million dollars to the Bank of England and has not been seen since.",
     ["He paid 3.2 million dollars", "to the Bank of England", "and", "has not been", "seen", "since"]),
])
def test_rules_on_hand_checked_sentences(sentence, units):
    assert RuleSegmenter().segment([sentence])[0].units == units


def test_sentence_split_keeps_abbreviations_initials_and_layout():
    text = "Dr. Smith met J. Doe in the U.S. yesterday.  It rained, e.g. all day!\n\nNew paragraph? yes, it is."
    spans = split_sentences(text)
    assert [text[a:b] for a, b in spans] == [
        "Dr. Smith met J. Doe in the U.S. yesterday.", "It rained, e.g. all day!", "New paragraph? yes, it is."]
    gaps = [text[b:a] for (_, b), (a, _) in zip(spans, spans[1:])]
    assert gaps == ["  ", "\n\n"]
    permuted = permute_text(text, spans, RuleSegmenter().segment([text[a:b] for a, b in spans]), "reversed",
                            random.Random(0))
    assert "  " in permuted and "\n\n" in permuted and Counter(words(permuted)) == Counter(words(text))


def test_segmenting_stays_linear_in_the_document_length():
    rng = random.Random(1)
    sentences = [" ".join(rng.choice(NAMES + FILLER + LINKS) for _ in range(12)) + "." for _ in range(1000)]

    texts = {n: " ".join(sentences[:n]) for n in (100, 1000)}
    best = {n: float("inf") for n in texts}
    for _ in range(7):  # interleaved, best of 7: a loaded machine slows both sizes alike
        for n, text in texts.items():
            t0 = time.perf_counter()
            spans = split_sentences(text)
            RuleSegmenter().segment([text[a:b] for a, b in spans])
            best[n] = min(best[n], time.perf_counter() - t0)
    small, large = best[100], best[1000]
    assert large / small < 30, (small, large)


# --------------------------------------------------------------------------- model answers


def test_model_answers_fall_back_with_their_reason():
    sentence = "Alice Smith is the mother of Bob Jones."
    good = check_segmentation(sentence, "Alice Smith [SEP] is [SEP] the mother [SEP] of Bob Jones.\nmore text")
    assert good.units == ["Alice Smith", "is", "the mother", "of Bob Jones"] and good.fallback is None
    assert good.terminal == "."
    assert check_segmentation(sentence, "Alice Smith is the mother of Bob Jones.").fallback == "no_sep"
    assert check_segmentation(sentence, None).fallback == "no_sep"
    dropped = check_segmentation(sentence, "Alice Smith [SEP] is [SEP] the mother")
    assert dropped.fallback == "changed_words" and dropped.units == ["Alice Smith is the mother of Bob Jones"]
    reordered = check_segmentation(sentence, "Bob Jones [SEP] is [SEP] the mother [SEP] of Alice Smith")
    assert reordered.fallback == "changed_words"


# --------------------------------------------------------------------------- openai, against a local server

KEY = "sk-test-" + secrets.token_hex(12)


class ChatServer:
    """A chat-completions endpoint: the sentence's marker word picks the answer."""

    def __init__(self, delay: float) -> None:
        self.hits: Counter[str] = Counter()
        self.unauthorized = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output quiet
                pass

            def do_POST(self):  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/chat/completions" or self.headers.get("Authorization") != f"Bearer {KEY}":
                    owner.unauthorized += 1
                    return self._send(401, b'{"error": "unauthorized"}')
                sentence = body["messages"][-1]["content"]
                marker = sentence.split()[0]
                owner.hits[marker] += 1
                if marker == "Slow":
                    time.sleep(delay)
                if marker == "Broken":
                    return self._send(500, b'{"error": "boom"}')
                if marker == "Garbled":
                    return self._send(200, b'{"choices": [ this is not json')
                segment, terminal = split_terminal(sentence)
                answer = {"Plain": sentence, "Altered": "Someone [SEP] else entirely"}.get(
                    marker, " [SEP] ".join(rule_units(segment)) + terminal)
                payload = {"id": "x", "object": "chat.completion", "model": body["model"],
                           "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                        "finish_reason": "stop"}]}
                self._send(200, json.dumps(payload).encode())

            def _send(self, status: int, data: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out first
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> ChatServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


SENTENCES = {
    "good": "Good Alice Smith is the mother of Bob Jones.",
    "slow": "Slow Carla Vent is the father of Dan Orr.",
    "broken": "Broken Eve Mallow is the author of the novel Greyfield.",
    "garbled": "Garbled Finn Arrow is the mother of Gil Stone.",
    "plain": "Plain Hana Lee is the inventor of the Sorrow engine.",
    "altered": "Altered Ivo Rand is the father of Jon Tusk.",
}


def test_openai_segmenter_counts_every_bad_answer_by_reason():
    with ChatServer(delay=1.0) as server:
        client = ChatClient(server.base_url, "tiny", Secret(KEY), timeout_s=0.3, retries=2, backoff_s=0.01)
        results = dict(zip(SENTENCES, OpenAISegmenter(client, max_in_flight=4).segment(list(SENTENCES.values()))))
        assert results["good"].fallback is None
        assert results["good"].units == ["Good Alice Smith", "is", "the mother", "of Bob Jones"]
        reasons = {k: r.fallback for k, r in results.items() if k != "good"}
        assert reasons == {"slow": "timeout", "broken": "http_500", "garbled": "malformed_response",
                           "plain": "no_sep", "altered": "changed_words"}
        for key, result in results.items():  # a fallback keeps the sentence whole
            if key != "good":
                body, terminal = split_terminal(SENTENCES[key])
                assert result.units == [body] and result.terminal == terminal
        # Timeouts and 5xx are retried (1 + 2 retries); a malformed or final answer is not.
        assert server.hits["Broken"] == 3 and server.hits["Slow"] == 3 and server.hits["Garbled"] == 1
        assert server.unauthorized == 0
        # Without the key the server refuses, and the refusal is counted, not retried.
        anonymous = ChatClient(server.base_url, "tiny", None, timeout_s=1, retries=2, backoff_s=0.01)
        assert OpenAISegmenter(anonymous).segment([SENTENCES["good"]])[0].fallback == "http_401"
        assert server.unauthorized == 1
    assert KEY not in repr(Secret(KEY)) and KEY not in str(client.api_key)


def test_openai_segmenter_in_a_run_counts_fallbacks_and_never_shows_the_key(ray_address, tmp_path, monkeypatch,
                                                                            capsys, caplog):
    monkeypatch.setenv("SPT_TEST_KEY", KEY)
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"id": k, "text": f"{s} Then Kim Lo is the mother of Lea Fox."}) + "\n"
                            for k, s in SENTENCES.items()))
    messages: list[str] = []
    with ChatServer(delay=1.0) as server:
        config = {"run": {"name": "spt-openai", "seed": 0},
                  "input": {"format": "jsonl", "path": str(data), "id_field": "id"},
                  "stages": [{"name": "permute", "probs": {"reversed": 1.0}, "segmenter": "openai",
                              "openai": {"base_url": server.base_url, "model": "tiny", "api_key_env": "SPT_TEST_KEY",
                                         "timeout_s": 0.3, "retries": 1, "backoff_s": 0.01}},
                             {"name": "order", "method": "random"}]}
        path = tmp_path / "spt.yaml"
        path.write_text(yaml.safe_dump(config))
        out = tmp_path / "run"
        manifest = run_pipeline(load_config(path), out, address=ray_address, log=messages.append)
    permute = next(s for s in manifest["stages"] if s["name"] == "permute")
    assert permute["added_by"] == {"permute.reversed": 6}
    info = permute["info"]
    assert info["fallbacks_by_reason"] == {"changed_words": 1, "http_500": 1, "malformed_response": 1, "no_sep": 1,
                                           "timeout": 1}
    assert info["sentences_segmented"] == 12 and info["api_key_env"] == "SPT_TEST_KEY"
    # The key is in no log line, no captured output, and no file of the run folder (manifest, cache records).
    captured = capsys.readouterr()
    seen = "\n".join(messages) + captured.out + captured.err + caplog.text
    assert KEY not in seen
    for file in out.rglob("*"):
        if file.is_file():
            assert KEY.encode() not in file.read_bytes(), file
    import ray

    # This test process's own cluster (under pytest-xdist, session_latest may be another's).
    context = ray.get_runtime_context()
    ray_logs = Path(context.get_temp_dir()) / context.get_session_name() / "logs"
    assert ray_logs.is_dir(), ray_logs
    for file in ray_logs.rglob("*"):
        if file.is_file() and file.stat().st_size < 50_000_000:
            assert KEY.encode() not in file.read_bytes(), file


# --------------------------------------------------------------------------- lm, with a real tiny model


def test_lm_segmenter_with_a_tiny_causal_lm_falls_back_and_keeps_the_text(tmp_path):
    from pipeline.models.lm import build_causal_lm, train_bpe_tokenizer
    from pipeline.models.lm_segmenter import LMSegmenter

    sentences = ["Alice Smith is the mother of Bob Jones.", "The bridge, which opened in 1932, spans the river.",
                 "Velmora Quistade wrote three books."]
    tokenizer = train_bpe_tokenizer(sentences * 20, vocab_size=300)
    model = build_causal_lm({"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 1024},
                            tokenizer, seed=0)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    segmenter = LMSegmenter(str(tmp_path), max_new_tokens=12, batch_size=2, device="cpu", threads=1)
    assert not segmenter.chat  # the BPE tokenizer has no chat template: the plain few-shot prompt
    results = segmenter.segment(sentences)
    assert all(r.fallback in ("no_sep", "changed_words") for r in results), results  # an untrained model
    for sentence, result in zip(sentences, results):
        spans = [(0, len(sentence))]
        assert permute_text(sentence, spans, [result], "reversed", random.Random(0)) == sentence
    # An answer does not depend on which sentences share its batch.
    alone = [segmenter.answers([s])[0] for s in sentences]
    assert segmenter.answers(sentences) == alone
