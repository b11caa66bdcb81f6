"""An OpenAI-compatible chat-completions client (vLLM, SGLang, any ``/v1/chat/completions``), and the
``openai`` segmenter of SPT built on it.

Standard library only (``urllib``). Each request has a socket timeout; a timeout, a refused
connection, HTTP 429 or a 5xx answer is retried ``retries`` times, waiting ``backoff_s * 2**k``
before retry ``k + 1``; any other answer is final. A request that still fails, or an answer that
is not a chat completion, gives no text and a reason (``timeout``, ``connection_error``,
``http_<status>``, ``malformed_response``); the segmenter then keeps the whole sentence and
counts the reason. At most ``max_in_flight`` requests run at once.

The API key comes from an environment variable that the config names; it travels as a
:class:`Secret`, whose ``repr`` hides it, and is only ever written into the Authorization header.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pipeline.models.segmenters import Segmented, chat_messages, check_segmentation, whole

_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class Secret:
    """A value that never shows in a repr, a log line or a traceback's locals dump."""

    __slots__ = ("_value",)

    def __init__(self, value: str | None) -> None:
        self._value = value

    def reveal(self) -> str | None:
        return self._value

    def __repr__(self) -> str:
        return "Secret(***)" if self._value else "Secret(None)"

    __str__ = __repr__


@dataclass(frozen=True)
class ChatAnswer:
    text: str | None
    reason: str | None = None  # why there is no text
    attempts: int = 1


class ChatClient:
    def __init__(self, base_url: str, model: str, api_key: Secret | None = None, timeout_s: float = 60.0,
                 retries: int = 3, backoff_s: float = 1.0, max_tokens: int = 128, temperature: float = 0.0) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = api_key or Secret(None)
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_tokens = max_tokens
        self.temperature = temperature

    def _request(self, messages: list[dict[str, str]]) -> urllib.request.Request:
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                           "temperature": self.temperature}).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = self.api_key.reveal()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return urllib.request.Request(self.url, data=body, headers=headers, method="POST")

    def _once(self, messages: list[dict[str, str]]) -> tuple[str | None, str | None, bool]:
        """(text, reason, retryable) of one attempt."""
        try:
            with urllib.request.urlopen(self._request(messages), timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            exc.close()
            return None, f"http_{exc.code}", exc.code in _RETRY_STATUS
        except TimeoutError:
            return None, "timeout", True
        except urllib.error.URLError as exc:
            timed_out = isinstance(exc.reason, TimeoutError)
            return None, "timeout" if timed_out else "connection_error", True
        except OSError:
            return None, "connection_error", True
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            return None, "malformed_response", False
        if not isinstance(content, str):
            return None, "malformed_response", False
        return content, None, False

    def complete(self, messages: list[dict[str, str]]) -> ChatAnswer:
        for attempt in range(self.retries + 1):
            text, reason, retryable = self._once(messages)
            if reason is None or not retryable or attempt == self.retries:
                return ChatAnswer(text, reason, attempt + 1)
            time.sleep(self.backoff_s * 2 ** attempt)
        raise AssertionError("unreachable")


class OpenAISegmenter:
    """SPT's segmenter on a chat-completions endpoint, ``max_in_flight`` requests at a time."""

    name = "openai"

    def __init__(self, client: ChatClient, max_in_flight: int = 8) -> None:
        self.client = client
        self.max_in_flight = max_in_flight

    def _one(self, sentence: str) -> Segmented:
        answer = self.client.complete(chat_messages(sentence))
        if answer.text is None:
            return whole(sentence, answer.reason)
        return check_segmentation(sentence, answer.text)

    def segment(self, sentences: list[str]) -> list[Segmented]:
        if not sentences:
            return []
        with ThreadPoolExecutor(max_workers=min(self.max_in_flight, len(sentences))) as pool:
            return list(pool.map(self._one, sentences))


def openai_segmenter(spec: dict[str, Any], api_key: Secret | None) -> OpenAISegmenter:
    """The segmenter for the stage's ``openai:`` section (a plain dict, as it reaches a Ray actor)."""
    client = ChatClient(spec["base_url"], spec["model"], api_key, timeout_s=spec["timeout_s"],
                        retries=spec["retries"], backoff_s=spec["backoff_s"], max_tokens=spec["max_tokens"],
                        temperature=spec["temperature"])
    return OpenAISegmenter(client, spec["max_in_flight"])
