"""Answer generators behind one interface.

- ``ExtractiveGenerator``, the embedded default: no server, no model. It picks
  the sentences of the retrieved passages best supported by the question and
  cites them as [n].
- ``OpenAIChatGenerator``: any OpenAI-compatible chat endpoint (vLLM,
  llama.cpp server, Ollama), configured by URL, model and key.
"""

from __future__ import annotations

import json
import math
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Protocol, Sequence

from hybridrag.agents.rag.store import Hit

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


class OpenAIChatGenerator:
    """Any OpenAI-compatible ``/chat/completions`` endpoint."""

    name = "openai"
    SYSTEM = (
        "Answer the question using only the numbered context passages. Cite the passages you use as [n]. "
        "If the context does not contain the answer, say that you do not know."
    )

    def __init__(self, base_url: str, model: str, api_key: str = "", timeout_s: float = 30.0, max_tokens: int = 256):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self._api_key = api_key
        self.timeout_s = timeout_s
        self.max_tokens = max_tokens

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIChatGenerator(url={self.url!r}, model={self.model!r})"

    def generate(self, questions: Sequence[str], contexts: Sequence[Sequence[Hit]]) -> list[Generated]:
        return [self._one(q, hits) for q, hits in zip(questions, contexts)]

    def _one(self, question: str, hits: Sequence[Hit]) -> Generated:
        if not hits:
            return Generated(NO_CONTEXT, [])
        context = "\n\n".join(f"[{i + 1}] {h.text}" for i, h in enumerate(hits))
        body = {
            "model": self.model,
            "messages": [
                {"role": "system", "content": self.SYSTEM},
                {"role": "user", "content": f"Context:\n{context}\n\nQuestion: {question}"},
            ],
            "max_tokens": self.max_tokens,
            "temperature": 0.0,
        }
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), method="POST")
        req.add_header("Content-Type", "application/json")
        if self._api_key:
            req.add_header("Authorization", f"Bearer {self._api_key}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                payload = json.loads(resp.read())
        except urllib.error.HTTPError as e:
            # 429 and 5xx may pass; other 4xx will not
            raise GeneratorError(f"chat endpoint answered HTTP {e.code}", transient=e.code == 429 or e.code >= 500) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            raise GeneratorError(f"chat endpoint unreachable: {getattr(e, 'reason', e)}", transient=True) from None
        try:
            text = payload["choices"][0]["message"]["content"].strip()
        except (KeyError, IndexError, TypeError, AttributeError):
            raise GeneratorError("chat endpoint returned no choices[0].message.content", transient=False) from None
        cited = sorted({int(n) - 1 for n in re.findall(r"\[(\d+)\]", text) if 0 < int(n) <= len(hits)})
        return Generated(text, cited)


def make_generator(settings) -> Generator:
    if settings.generator == "extractive":
        return ExtractiveGenerator(settings.extractive_sentences)
    if settings.generator == "openai":
        if not settings.openai_model:
            raise ValueError("generator=openai needs OPENAI_MODEL (HYBRIDRAG_OPENAI_MODEL)")
        return OpenAIChatGenerator(
            settings.openai_base_url,
            settings.openai_model,
            settings.openai_api_key.get_secret_value(),
            settings.openai_timeout_s,
        )
    raise ValueError(f"{settings.generator} is not a valid generator (extractive, openai)")
