"""The OpenAI-compatible generator on the real parts: a worker whose endpoint is down, and a real
llama.cpp server with gemma-3-270m (the `llm` extra; those tests skip without it)."""

from __future__ import annotations

import json

import pytest

from hybridrag.agents.kafka.broker import free_port
from hybridrag.agents.kafka.client import AsyncClient
from hybridrag.agents.kafka.schemas import Document
from hybridrag.agents.rag.generator import OpenAIChatGenerator
from hybridrag.agents.rag.local_llm import LocalLLMServer, llm_extra_installed
from hybridrag.agents.rag.store import Hit
from hybridrag.agents.settings import RESOURCES
from tests.conftest import run

pytestmark = pytest.mark.integration
needs_llm = pytest.mark.skipif(not llm_extra_installed(), reason="pip install 'hybridrag[llm]' (make test does)")


def demo(n: int = 4) -> tuple[list[dict], dict[str, dict]]:
    questions = [json.loads(line) for line in (RESOURCES / "demo" / "questions.jsonl").read_text().splitlines() if line]
    corpus = {d["_id"]: d for d in map(json.loads, (RESOURCES / "demo" / "corpus.jsonl").read_text().splitlines()) if d}
    return questions[:n], corpus


def serve_demo(make_settings, make_worker, **overrides):
    """A worker over the passages that answer the first demo questions (plus a few others)."""
    questions, corpus = demo()
    ids = [q["expected_doc_id"] for q in questions] + [i for i in corpus if i not in {q["expected_doc_id"] for q in questions}][:8]
    docs = [Document(doc_id=i, text=corpus[i]["text"], title=corpus[i]["title"]) for i in ids]
    settings = make_settings(**overrides)
    worker = make_worker(settings)

    async def publish():
        async with AsyncClient(settings) as c:
            await c.publish_documents(docs)

    run(publish())
    worker.wait_ready(min_rows=len(docs))
    return settings, worker, questions


def ask(settings, texts):
    async def go():
        async with AsyncClient(settings) as c:
            return await c.ask_many(texts, timeout_s=120)

    return run(go())


def test_a_down_endpoint_falls_back_to_extractive_and_the_answer_says_so(make_settings, make_worker):
    """Nothing listens at the chat endpoint: answers still come, extractive, with
    generator=extractive-fallback, confident and citing the passage that answers them."""
    settings, worker, questions = serve_demo(
        make_settings, make_worker, generator="openai", openai_base_url=f"http://127.0.0.1:{free_port()}/v1",
        openai_model="m", openai_retries=1, openai_timeout_s=2.0)
    answers = ask(settings, [q["question"] for q in questions])
    for q, a in zip(questions, answers):
        assert a.generator == "extractive-fallback", (a.generator, worker.log_tail())
        assert a.confident and "[1]" in a.answer
        assert q["expected_doc_id"] in [s.doc_id for s in a.sources]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    if not llm_extra_installed():
        pytest.skip("pip install 'hybridrag[llm]' (make test does)")
    with LocalLLMServer(log_path=tmp_path_factory.mktemp("llm") / "llama.log") as server:
        yield server


@needs_llm
def test_the_real_server_answers_a_batch_from_its_passages(llm):
    """Four questions in one batch against llama.cpp's server: every answer is text from gemma (not the
    fallback), prompted as a base model, and cites only passages it was given."""
    questions, corpus = demo(4)
    hits = [[Hit(id=f"{q['expected_doc_id']}#0", doc_id=q["expected_doc_id"], chunk=0, score=0.8,
                 text=corpus[q["expected_doc_id"]]["text"])] for q in questions]
    g = OpenAIChatGenerator(llm.base_url, llm.model, api="completions", concurrency=4, max_tokens=48, timeout_s=120)
    out = g.generate([q["question"] for q in questions], hits)
    assert len(out) == 4
    for gen in out:
        assert gen.text.strip() and gen.generator == "", gen
        assert set(gen.cited) <= {0}


@needs_llm
def test_a_worker_answers_through_the_real_server(make_settings, make_worker, llm):
    """The worker's answers come from the local server end to end: generator=openai, with the sources
    that retrieval found."""
    settings, worker, questions = serve_demo(
        make_settings, make_worker, generator="openai", openai_api="completions", openai_base_url=llm.base_url,
        openai_model=llm.model, openai_max_tokens=48, openai_timeout_s=120, generator_fallback="wait")
    answers = ask(settings, [q["question"] for q in questions[:2]])
    for q, a in zip(questions, answers):
        assert a.generator == "openai" and a.answer.strip(), worker.log_tail()
        assert q["expected_doc_id"] in [s.doc_id for s in a.sources]
