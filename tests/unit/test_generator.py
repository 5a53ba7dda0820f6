from hybridrag.agents.rag.generator import NO_CONTEXT, ExtractiveGenerator, OpenAIChatGenerator, sentence_support, split_sentences
from hybridrag.agents.rag.store import Hit


def hit(i, text, score):
    return Hit(id=f"d{i}#0", doc_id=f"d{i}", chunk=0, text=text, score=score)


def test_extractive_answer_quotes_the_best_supported_sentences_and_cites_them():
    hits = [
        hit(1, "Kafka is an event log. Compilers are unrelated here.", 0.6),
        hit(2, "A compiler translates source code into machine code. It also optimises programs.", 0.8),
    ]
    g = ExtractiveGenerator(max_sentences=1).generate(["What does a compiler translate?"], [hits])[0]
    assert g.text == "A compiler translates source code into machine code. [1]"
    assert g.cited == [1]


def test_no_hits_says_so():
    g = ExtractiveGenerator().generate(["anything"], [[]])[0]
    assert g.text == NO_CONTEXT and g.cited == []


def test_support_grows_with_overlap_and_score():
    terms = {"compiler", "code"}
    assert sentence_support(terms, "the compiler emits code", 0.8) > sentence_support(terms, "the compiler", 0.8)
    assert sentence_support(terms, "the compiler", 0.9) > sentence_support(terms, "the compiler", 0.5)
    assert sentence_support(terms, "", 0.9) == 0.0


def test_sentence_split():
    assert split_sentences("One. Two! Three? four") == ["One.", "Two!", "Three?", "four"]


def test_openai_generator_never_shows_its_key():
    g = OpenAIChatGenerator("http://x/v1", "m", api_key="sk-secret-123")
    assert "sk-secret" not in repr(g) and "sk-secret" not in str(vars(g).get("url"))


def test_openai_generator_reports_an_unreachable_endpoint_as_transient():
    from hybridrag.agents.rag.generator import GeneratorError

    g = OpenAIChatGenerator("http://127.0.0.1:9/v1", "m", timeout_s=1, retries=0)
    try:
        g.generate(["q"], [[hit(1, "text.", 0.9)]])
    except GeneratorError as e:
        assert e.transient
    else:
        raise AssertionError("expected GeneratorError")


def test_weak_passages_are_not_quoted_even_when_they_share_words():
    hits = [hit(1, "A firewall guards a network from outside attacks.", 0.8),
            hit(2, "A firewall protect against question words repeated here.", 0.3)]
    g = ExtractiveGenerator(max_sentences=2).generate(["What does a firewall protect against?"], [hits])[0]
    assert g.cited == [0] and "repeated" not in g.text


# --- the OpenAI-compatible generator against an in-memory endpoint ---------------------------------

import asyncio  # noqa: E402

import httpx  # noqa: E402
import pytest  # noqa: E402

from hybridrag.agents.rag.generator import (  # noqa: E402
    GeneratorError, backoff_delay, completion_prompt, keep_given_citations, make_generator,
)


class FakeEndpoint:
    """An OpenAI-compatible endpoint in memory: answers after ``delay_s``, counts the requests it holds at once,
    and fails the first ``fail_first`` calls with ``fail_status`` (or hangs them past any timeout)."""

    def __init__(self, delay_s=0.05, answer="A compiler translates code [1].", fail_first=0, fail_status=503,
                 hang=False):
        self.delay_s, self.answer, self.fail_first, self.fail_status, self.hang = delay_s, answer, fail_first, fail_status, hang
        self.calls, self.in_flight, self.max_in_flight = 0, 0, 0
        self.requests: list[httpx.Request] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        self.requests.append(request)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.hang:
                await asyncio.sleep(3600)
            await asyncio.sleep(self.delay_s)
            if self.calls <= self.fail_first:
                return httpx.Response(self.fail_status, json={"error": "busy"})
            if request.url.path.endswith("/chat/completions"):
                return httpx.Response(200, json={"choices": [{"message": {"content": self.answer}}]})
            return httpx.Response(200, json={"choices": [{"text": " " + self.answer}]})
        finally:
            self.in_flight -= 1


def chat(endpoint, **kw):
    kw.setdefault("backoff_s", 0.01)
    return OpenAIChatGenerator("http://llm/v1", "m", transport=httpx.MockTransport(endpoint), **kw)


HITS = [hit(1, "A compiler translates source code into machine code.", 0.8), hit(2, "Kafka is a log.", 0.5)]


@pytest.mark.parametrize("concurrency", [1, 4, 8])
def test_a_batch_goes_out_concurrently_up_to_the_bound(concurrency):
    """Eight questions, one batch: the endpoint holds at most `concurrency` requests at once, and exactly that many."""
    endpoint = FakeEndpoint(delay_s=0.05)
    out = chat(endpoint, concurrency=concurrency).generate(["What is a compiler?"] * 8, [HITS] * 8)
    assert [g.cited for g in out] == [[0]] * 8 and all(g.confident for g in out)
    assert endpoint.calls == 8 and endpoint.max_in_flight == concurrency


def test_every_request_gets_the_configured_timeout_not_httpx_default():
    """A server that queues requests (llama.cpp's takes one at a time) answers the eighth after seven others."""
    g = chat(FakeEndpoint(delay_s=0), timeout_s=120)
    g.generate(["q"], [HITS])
    assert g._client.timeout.read == g._client.timeout.connect == 120


def test_transient_errors_are_retried_with_jitter_then_answered():
    endpoint = FakeEndpoint(fail_first=2, fail_status=503)
    (g,) = chat(endpoint, retries=2, concurrency=1).generate(["q"], [HITS])
    assert endpoint.calls == 3 and g.text == "A compiler translates code [1]." and g.generator == ""


def test_backoff_is_full_jitter_under_the_cap():
    import random

    rng = random.Random(0)
    delays = [backoff_delay(a, 0.5, 2.0, rng) for a in range(6) for _ in range(50)]
    assert all(0.0 <= d <= 2.0 for d in delays) and len(set(delays)) > 100


def test_a_request_past_its_timeout_falls_back_to_extractive_and_says_so():
    """The endpoint hangs: after its retries the answer is extractive, its generator field names the fallback,
    and for the cooldown the endpoint is not tried again."""
    endpoint = FakeEndpoint(hang=True)
    g = chat(endpoint, timeout_s=0.2, retries=1, cooldown_s=60, fallback=ExtractiveGenerator(1))
    (first,) = g.generate(["What does a compiler translate?"], [HITS])
    assert first.generator == "extractive-fallback" and first.cited == [0] and "[1]" in first.text
    assert endpoint.calls == 2  # one try and one retry
    (second,) = g.generate(["What does a compiler translate?"], [HITS])
    assert second.generator == "extractive-fallback" and endpoint.calls == 2  # cooling down: not tried


def test_without_a_fallback_a_down_endpoint_is_a_transient_error_and_the_batch_waits():
    endpoint = FakeEndpoint(fail_first=99, fail_status=502)
    with pytest.raises(GeneratorError) as e:
        chat(endpoint, retries=1).generate(["q"], [HITS])
    assert e.value.transient and "HTTP 502" in str(e.value)


def test_a_rejected_request_is_not_papered_over_by_the_fallback():
    """401 (a wrong key) will not pass by waiting, and an extractive answer would hide it: the record is dead-lettered."""
    endpoint = FakeEndpoint(fail_first=99, fail_status=401)
    with pytest.raises(GeneratorError) as e:
        chat(endpoint, fallback=ExtractiveGenerator()).generate(["q"], [HITS])
    assert not e.value.transient and endpoint.calls == 1


def test_citations_outside_the_given_passages_are_dropped_and_the_answer_is_not_confident():
    (g,) = chat(FakeEndpoint(answer="Compilers translate [1]. Also see [3] and [2, 7].")).generate(["q"], [HITS])
    assert g.text == "Compilers translate [1]. Also see and [2]." and g.cited == [0, 1] and not g.confident
    assert keep_given_citations("Fine [1][2].", 2) == ("Fine [1][2].", [0, 1], True)
    assert keep_given_citations("No citation at all.", 2) == ("No citation at all.", [], True)


def test_a_base_model_is_prompted_as_one_on_the_completions_endpoint():
    """gemma-3-270m has no chat template worth the name: the passages, the question, and 'Answer:' to continue."""
    endpoint = FakeEndpoint()
    (g,) = chat(endpoint, api="completions").generate(["What is a compiler?"], [HITS])
    import json

    req = endpoint.requests[0]
    body = json.loads(req.content)
    assert req.url.path == "/v1/completions" and body["prompt"] == completion_prompt("What is a compiler?", HITS)
    assert body["prompt"].endswith("Question: What is a compiler?\nAnswer:") and "[2] Kafka is a log." in body["prompt"]
    assert g.text == "A compiler translates code [1]." and g.cited == [0]


def test_three_environment_variables_are_enough_for_a_hosted_endpoint(monkeypatch):
    """OPENAI_BASE_URL, OPENAI_MODEL and OPENAI_API_KEY (with the generator chosen) reach the request as they are."""
    from hybridrag.agents.settings import Settings

    monkeypatch.setenv("HYBRIDRAG_GENERATOR", "openai")
    monkeypatch.setenv("OPENAI_BASE_URL", "https://api.example.test/v1")
    monkeypatch.setenv("OPENAI_MODEL", "gpt-test")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    g = make_generator(Settings())
    endpoint = FakeEndpoint()
    g._transport = httpx.MockTransport(endpoint)
    g.generate(["q"], [HITS])
    req = endpoint.requests[0]
    assert str(req.url) == "https://api.example.test/v1/chat/completions"
    assert req.headers["Authorization"] == "Bearer sk-test"
    import json

    assert json.loads(req.content)["model"] == "gpt-test"
    assert isinstance(g.fallback, ExtractiveGenerator)  # the documented default when the endpoint is down
