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

    g = OpenAIChatGenerator("http://127.0.0.1:9/v1", "m", timeout_s=1)
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
