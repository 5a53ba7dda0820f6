"""Answer generators behind one interface.

- ``ExtractiveGenerator``, the embedded default: no server, no model. It picks
  the sentences of the retrieved passages best supported by the question and
  cites them as [n].
- ``OpenAIChatGenerator``: any OpenAI-compatible endpoint (vLLM, llama.cpp
  server, Ollama, a hosted API), configured by URL, model and key. A batch's
  requests go out concurrently, bounded, each with its own timeout and retries
  with jitter. When the endpoint stays down, an answer falls back to the
  extractive generator and says so in its ``generator`` field.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import re
import threading
import time
from dataclasses import dataclass
from typing import Protocol, Sequence

import httpx

from hybridrag.agents.rag.store import Hit

log = logging.getLogger(__name__)
NO_CONTEXT = "No confident context: nothing in the index supports an answer to this question."

_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+")
_WORD = re.compile(r"[a-z0-9]+")
_STOPWORDS = frozenset(
    """a an the of to in on for and or but is are was were be been being by with as at from that this these
    those it its into than then so such what which who whom whose when where why how do does did can could
    should would will shall may might must i you he she we they me him her us them my your our their not no
    there here about also any some all each if""".split()
)


def content_words(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS and len(w) > 1]


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if len(s.strip()) > 2]


@dataclass
class Generated:
    text: str
    cited: list[int]  # indices into the hits that the text cites
    confident: bool = True  # False when the text cited a passage it was not given
    generator: str = ""  # who wrote it when not the generator asked (a fallback); empty: that one


class Generator(Protocol):
    name: str

    def generate(self, questions: Sequence[str], contexts: Sequence[Sequence[Hit]]) -> list[Generated]:
        """One answer per question, from that question's retrieved hits."""
        ...


def sentence_support(question_terms: set[str], sentence: str, passage_score: float) -> float:
    """How well one sentence supports the question: term overlap, weighted by its passage's retrieval score.

    The overlap is the share of the question's content words the sentence
    contains (log-damped for long sentences), so a sentence that restates the
    question's subject and says something about it wins over filler.
    """
    words = content_words(sentence)
    if not words or not question_terms:
        return 0.0
    overlap = len(question_terms.intersection(words)) / len(question_terms)
    length_penalty = 1.0 / (1.0 + math.log1p(max(0, len(words) - 25) / 25))
    return passage_score * (0.25 + overlap) * length_penalty


class ExtractiveGenerator:
    name = "extractive"

    def __init__(self, max_sentences: int = 3, relative_floor: float = 0.75):
        self.max_sentences = max_sentences
        # quote only passages close to the best one: a weak fifth source may be
        # on topic for retrieval yet off topic for the answer
        self.relative_floor = relative_floor

    def generate(self, questions: Sequence[str], contexts: Sequence[Sequence[Hit]]) -> list[Generated]:
        return [self._one(q, hits) for q, hits in zip(questions, contexts)]

    def _one(self, question: str, hits: Sequence[Hit]) -> Generated:
        if not hits:
            return Generated(NO_CONTEXT, [])
        terms = set(content_words(question))
        floor = max(h.score for h in hits) * self.relative_floor
        scored = []  # (support, hit index, position in passage, sentence)
        for i, hit in enumerate(hits):
            if hit.score < floor:
                continue
            for pos, sent in enumerate(split_sentences(hit.text)):
                scored.append((sentence_support(terms, sent, hit.score), i, pos, sent))
        if not scored:
            return Generated(NO_CONTEXT, [])
        best = sorted(scored, key=lambda s: -s[0])[: self.max_sentences]
        # read in source order, so consecutive sentences of one passage stay in sequence
        best.sort(key=lambda s: (s[1], s[2]))
        cited = sorted({s[1] for s in best})
        number = {hit_idx: n + 1 for n, hit_idx in enumerate(cited)}
        text = " ".join(f"{s[3]} [{number[s[1]]}]" for s in best)
        return Generated(text, cited)


class GeneratorError(RuntimeError):
    """The chat endpoint failed; ``transient`` says whether a retry may help."""

    def __init__(self, message: str, transient: bool):
        super().__init__(message)
        self.transient = transient


_CITATION = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")


def keep_given_citations(text: str, n_passages: int) -> tuple[str, list[int], bool]:
    """The text with only citations of passages ``1..n_passages``; their 0-based indices; whether none was dropped.

    A model may cite ``[7]`` with five passages in its prompt, or a number it
    saw in a passage. Such a marker is removed from the text and the answer is
    not confident: it claims a source the reader cannot check.
    """
    cited: set[int] = set()
    dropped = False

    def keep(m: re.Match) -> str:
        nonlocal dropped
        numbers = [int(n) for n in re.split(r"\s*,\s*", m.group(1))]
        good = [n for n in numbers if 1 <= n <= n_passages]
        dropped = dropped or len(good) < len(numbers)
        cited.update(n - 1 for n in good)
        return "[" + ", ".join(map(str, good)) + "]" if good else ""

    out = _CITATION.sub(keep, text)
    out = re.sub(r"[ \t]+([.,;:!?])", r"\1", re.sub(r"[ \t]{2,}", " ", out)).strip()
    return out, sorted(cited), not dropped


def numbered_context(hits: Sequence[Hit]) -> str:
    return "\n\n".join(f"[{i + 1}] {h.text}" for i, h in enumerate(hits))


def completion_prompt(question: str, hits: Sequence[Hit]) -> str:
    """A base model's prompt: the passages, the question, and "Answer:" for it to continue.

    A base model (gemma-3-270m, say) has no chat template to follow
    instructions with; it continues a document, so the prompt is one whose
    natural continuation is the answer.
    """
    return (f"Numbered passages, a question, and its answer citing the passages it uses as [n].\n\n"
            f"{numbered_context(hits)}\n\nQuestion: {question}\nAnswer:")


def backoff_delay(attempt: int, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Full jitter (uniform in [0, min(cap, base * 2^attempt)]): concurrent retries do not arrive together.

    https://aws.amazon.com/blogs/architecture/exponential-backoff-and-jitter/
    """
    return rng.uniform(0.0, min(cap_s, base_s * 2 ** attempt))


class _EventLoopThread:
    """One event loop on a daemon thread: the worker calls ``generate`` from an executor
    thread (or anywhere), and the requests of every batch share its connection pool."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name=name, daemon=True).start()

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()


class OpenAIChatGenerator:
    """Any OpenAI-compatible endpoint: ``/chat/completions``, or ``/completions`` for a base model.

    ``generate`` sends a batch's requests concurrently, at most ``concurrency``
    at once, each limited to ``timeout_s`` and retried ``retries`` times with
    jittered backoff on a transient error (connection, timeout, 429, 5xx). A
    request that still fails goes to ``fallback`` when there is one (the
    answer's ``generator`` says so), and the endpoint is skipped for
    ``cooldown_s`` so a dead endpoint costs one round of retries, not one per
    batch. Without a fallback the error is raised and the batch waits.
    """

    name = "openai"
    SYSTEM = (
        "Answer the question using only the numbered context passages. Cite the passages you use as [n]. "
        "If the context does not contain the answer, say that you do not know."
    )

    def __init__(self, base_url: str, model: str, api_key: str = "", timeout_s: float = 30.0, max_tokens: int = 256,
                 *, api: str = "chat", concurrency: int = 8, retries: int = 2, backoff_s: float = 0.5,
                 backoff_max_s: float = 5.0, cooldown_s: float = 10.0, fallback: "Generator | None" = None,
                 transport: httpx.AsyncBaseTransport | None = None):
        if api not in ("chat", "completions"):
            raise ValueError(f"{api} is not a valid api (chat, completions)")
        self.url = base_url.rstrip("/") + ("/chat/completions" if api == "chat" else "/completions")
        self.model = model
        self._api_key = api_key
        self.api = api
        self.timeout_s = timeout_s
        self.max_tokens = max_tokens
        self.concurrency = concurrency
        self.retries = retries
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.cooldown_s = cooldown_s
        self.fallback = fallback
        self._down_until = 0.0  # monotonic time before which the endpoint is not tried
        self._rng = random.Random()
        self._runner: _EventLoopThread | None = None
        self._transport = transport  # tests hand in an in-memory endpoint
        self._client: httpx.AsyncClient | None = None
        self._semaphore: asyncio.Semaphore | None = None

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIChatGenerator(url={self.url!r}, model={self.model!r}, concurrency={self.concurrency})"

    def generate(self, questions: Sequence[str], contexts: Sequence[Sequence[Hit]]) -> list[Generated]:
        if self._runner is None:
            self._runner = _EventLoopThread("openai-generator")
        return self._runner.run(self.agenerate(questions, contexts))

    async def agenerate(self, questions: Sequence[str], contexts: Sequence[Sequence[Hit]]) -> list[Generated]:
        """The batch's answers, its requests in flight together (at most ``concurrency``)."""
        if self._client is None:  # bound to the loop that first uses it
            # httpx's own default (5 s per read) would cut off a server that queues requests (llama.cpp)
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s),
                                             limits=httpx.Limits(max_connections=self.concurrency),
                                             transport=self._transport)
            self._semaphore = asyncio.Semaphore(self.concurrency)
        results = await asyncio.gather(*(self._answer(q, hits) for q, hits in zip(questions, contexts)),
                                       return_exceptions=True)
        fatal = [r for r in results if isinstance(r, BaseException)]
        if fatal:
            raise fatal[0]
        return results  # type: ignore[return-value]

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _answer(self, question: str, hits: Sequence[Hit]) -> Generated:
        if not hits:
            return Generated(NO_CONTEXT, [])
        try:
            if time.monotonic() < self._down_until:
                raise GeneratorError("chat endpoint marked down after repeated failures", transient=True)
            text = await self._request_with_retries(self._body(question, hits))
        except GeneratorError as e:
            if not e.transient or self.fallback is None:
                raise
            if time.monotonic() >= self._down_until:
                log.warning("%s; answering with the %s generator for %.0fs", e, self.fallback.name, self.cooldown_s)
                self._down_until = time.monotonic() + self.cooldown_s
            g = self.fallback.generate([question], [hits])[0]
            return Generated(g.text, g.cited, g.confident, f"{self.fallback.name}-fallback")
        text, cited, confident = keep_given_citations(text, len(hits))
        return Generated(text, cited, confident)

    def _body(self, question: str, hits: Sequence[Hit]) -> dict:
        body = {"model": self.model, "max_tokens": self.max_tokens, "temperature": 0.0}
        if self.api == "completions":
            # a blank line or a new question ends a base model's answer
            return {**body, "prompt": completion_prompt(question, hits), "stop": ["\n\n", "\nQuestion:"]}
        return {**body, "messages": [
            {"role": "system", "content": self.SYSTEM},
            {"role": "user", "content": f"Context:\n{numbered_context(hits)}\n\nQuestion: {question}"},
        ]}

    async def _request_with_retries(self, body: dict) -> str:
        attempt = 0
        while True:
            try:
                return await self._request(body)
            except GeneratorError as e:
                if not e.transient or attempt >= self.retries:
                    raise
                await asyncio.sleep(backoff_delay(attempt, self.backoff_s, self.backoff_max_s, self._rng))
                attempt += 1

    async def _request(self, body: dict) -> str:
        assert self._client is not None and self._semaphore is not None
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        async with self._semaphore:
            try:
                # the whole request, not each read, is limited: a server that trickles tokens still times out
                resp = await asyncio.wait_for(self._client.post(self.url, json=body, headers=headers), self.timeout_s)
            except (asyncio.TimeoutError, httpx.TimeoutException):
                raise GeneratorError(f"chat endpoint timed out after {self.timeout_s:g}s", transient=True) from None
            except httpx.TransportError as e:
                raise GeneratorError(f"chat endpoint unreachable: {type(e).__name__}", transient=True) from None
        if resp.status_code >= 400:
            # 429 and 5xx may pass; other 4xx will not. The body is not quoted: it may echo the key
            code = resp.status_code
            raise GeneratorError(f"chat endpoint answered HTTP {code}", transient=code == 429 or code >= 500)
        try:
            choice = resp.json()["choices"][0]
            text = choice["message"]["content"] if self.api == "chat" else choice["text"]
            return text.strip()
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            field = "choices[0].message.content" if self.api == "chat" else "choices[0].text"
            raise GeneratorError(f"chat endpoint returned no {field}", transient=False) from None


def make_generator(settings) -> Generator:
    if settings.generator == "extractive":
        return ExtractiveGenerator(settings.extractive_sentences)
    if settings.generator == "openai":
        if not settings.openai_model:
            raise ValueError("generator=openai needs OPENAI_MODEL (HYBRIDRAG_OPENAI_MODEL)")
        fallback = ExtractiveGenerator(settings.extractive_sentences) if settings.generator_fallback == "extractive" else None
        return OpenAIChatGenerator(
            settings.openai_base_url,
            settings.openai_model,
            settings.openai_api_key.get_secret_value(),
            settings.openai_timeout_s,
            settings.openai_max_tokens,
            api=settings.openai_api,
            concurrency=settings.openai_concurrency,
            retries=settings.openai_retries,
            backoff_s=settings.retry_backoff_s,
            cooldown_s=settings.openai_cooldown_s,
            fallback=fallback,
        )
    raise ValueError(f"{settings.generator} is not a valid generator (extractive, openai)")
