"""The evaluation harness end to end with the real MiniLM encoder on a small real slice.

The slice is the WordNet reverse dictionary (80 held-out definitions, 600
word entries), built from the real corpora cache.
"""

import json

import numpy as np
import pytest

from hybridrag.agents.evaluation import datasets
from hybridrag.agents.evaluation import harness
from hybridrag.models.encoders import OriginalEncoder
from hybridrag.agents.cli.eval_cli import app

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def slice_path(tmp_path_factory):
    return datasets.build_wordnet_revdict(tmp_path_factory.mktemp("beir") / "wn", max_queries=80, max_corpus=600)


@pytest.fixture(scope="module")
def encoder():
    return OriginalEncoder()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One embedding cache for the module: the slice's corpus is encoded once."""
    path = tmp_path_factory.mktemp("emb")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(harness, "embeddings_cache_dir", lambda: path)
        yield path


def test_original_encoder_beats_bm25_and_random_by_a_wide_margin(slice_path, encoder, cache_dir, tmp_path):
    """A reverse dictionary is a semantic task: the dense encoder ranks far above chance."""
    systems = [
        harness.DenseSystem("original", encoder, progress=False),
        harness.BM25System(),
        harness.RandomSystem(),
    ]
    report = harness.run_evaluation([str(slice_path)], systems, lee=False, out_path=tmp_path / "eval.json")
    (entry,) = report["datasets"].values()
    assert entry["queries"] == 80 and entry["corpus"] == 600
    got = entry["systems"]
    assert got["original"]["nDCG@10"] > got["random"]["nDCG@10"] + 0.3
    assert got["original"]["R@100"] > 0.8
    assert got["bm25"]["nDCG@10"] > got["random"]["nDCG@10"]
    assert got["random"]["R@100"] < 0.35  # 100 of 600 docs: ~0.17 expected
    for m in got.values():
        assert m["R@10"] <= m["R@50"] <= m["R@100"]
    assert json.loads((tmp_path / "eval.json").read_text())["datasets"] == report["datasets"]
    table = harness.format_table(report)
    assert "original" in table and "1.000" in table


def test_corpus_embeddings_are_cached_per_encoder_and_corpus(encoder, cache_dir):
    """The first encode writes the cache; the second reads the same vectors; another corpus misses."""
    docs = [f"passage number {i} about {w}" for i, w in enumerate(["cats", "dogs", "boats", "trains"] * 5)]
    ds = harness.Dataset("tiny", [str(i) for i in range(20)], docs, {}, {}, fingerprint="tiny-v1")
    v1, cached1 = harness.encode_corpus(encoder, ds, progress=False)
    v2, cached2 = harness.encode_corpus(encoder, ds, progress=False)
    assert (cached1, cached2) == (False, True)
    np.testing.assert_array_equal(v1, v2)
    assert v1.shape == (20, 384) and v1.dtype == np.float32
    assert (cache_dir / encoder.version / "tiny-tiny-v1.npy").exists()
    ds.fingerprint = "tiny-v2"
    assert harness.encode_corpus(encoder, ds, progress=False)[1] is False


def test_a_custom_retriever_plugs_in_and_decides_the_ranking(slice_path, encoder, cache_dir):
    """A retriever factory sees the corpus embeddings and the query vectors; its ranking is what gets scored."""
    ds = harness.Dataset.load(str(slice_path))
    seen = {}

    def reversed_top100(doc_ids, doc_vecs, doc_texts):
        exact = harness.exact_cosine_retriever(doc_ids, doc_vecs, doc_texts)
        seen["corpus"] = doc_vecs.shape

        def retrieve(query_texts, query_vecs, k):
            seen["queries"] = query_vecs.shape
            return [ranked[::-1] for ranked in exact(query_texts, query_vecs, 100)]

        return retrieve

    exact = harness.evaluate_system(harness.DenseSystem("original", encoder, progress=False), ds)
    assert exact["corpus_cached"] == 1.0  # encoded by the first test
    flipped = harness.evaluate_system(
        harness.DenseSystem("flipped", encoder, retriever_factory=reversed_top100, progress=False), ds
    )
    assert seen == {"corpus": (600, 384), "queries": (80, 384)}
    assert flipped["R@100"] == pytest.approx(exact["R@100"])  # same set, worst order
    assert flipped["nDCG@10"] < exact["nDCG@10"] / 3


def test_lee_correlation_is_positive_and_strong(encoder):
    """MiniLM's cosine tracks the human ratings of the 50 Lee documents."""
    c = harness.lee_correlation(encoder)
    assert c["pairs"] == 1225
    assert 0.4 < c["pearson"] < 1 and 0.3 < c["spearman"] < 1


def test_cli_runs_bm25_on_a_beir_folder(slice_path, tmp_path):
    """``hybridrag eval`` on a folder path, BM25 only, writes the JSON report."""
    from typer.testing import CliRunner

    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["eval", "-d", str(slice_path), "--systems", "bm25", "--no-lee", "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert 0 < report["datasets"]["wn"]["systems"]["bm25"]["nDCG@10"] < 1
    bad = CliRunner().invoke(app, ["eval", "-d", str(slice_path), "--systems", "nope", "--out", str(out)])
    assert bad.exit_code != 0 and "not a valid system" in bad.output


def test_fused_system_reports_its_weight_fixed_weights_and_the_oracle(slice_path, encoder, cache_dir, tmp_path):
    """``fused`` chooses a weight from the corpus alone and adds rows for fixed weights and the best in
    hindsight; at weight 0 the fused ranking is the dense ranking."""
    systems = [harness.DenseSystem("dense", encoder, progress=False), harness.LexicalSystem(),
               harness.FusedSystem("fused", encoder, progress=False)]
    report = harness.run_evaluation([str(slice_path)], systems, lee=False, out_path=tmp_path / "eval.json")
    (entry,) = report["datasets"].values()
    got = entry["systems"]
    assert {"fused", "fused-oracle", "fused-w0.10", "fused-w0.20", "fused-w0.30", "fused-w0.50"} <= set(got)
    assert 0.0 <= got["fused"]["weight"] <= 1.0 and 0 < got["fused"]["self_check"] <= 1
    curve = got["fused-oracle"]["curve"]
    assert curve["0.00"] == pytest.approx(got["dense"]["nDCG@10"], abs=1e-9)
    assert got["fused-oracle"]["nDCG@10"] == max(curve.values()) >= got["fused"]["nDCG@10"]
    assert "fused-oracle" in harness.format_table(report, baseline="dense")
