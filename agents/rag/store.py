"""The vector store: Milvus Lite (a local file) or a Milvus server, through the same code.

One collection per encoder version (``<base>__<version>``), so every stored
vector records the encoder that made it and a query is encoded with the
version that built the collection it searches. Rows are upserted by the
deterministic chunk id, so replaying a document changes no row count.

Milvus Lite is single-process: exactly one worker process owns the file.
Point ``HYBRIDRAG_MILVUS_URI`` at a Milvus server to run several workers.

**Hubness.** Every row also stores the mean cosine of its vector to its
``hubness_k`` nearest real (not synthetic) rows of the same tenant. In
high-dimensional embedding spaces some points ("hubs") sit close to
everything and crowd the top of unrelated queries' lists (Radovanović et al.
2010, https://jmlr.org/papers/v11/radovanovic10a.html); subtracting this
local density from the cosine is CSLS (Conneau et al. 2018,
https://arxiv.org/abs/1710.04087), the adaptive retriever's fine signal. An
upsert estimates the new rows' hubness from the rows already stored; since an
early row saw fewer neighbours than a late one, the whole collection is
recomputed whenever it has grown by ``hubness_refresh_growth`` since the last
time (a geometric schedule, so the total work stays a small multiple of one
refresh), and before a re-index is swapped in.

**Lexical index.** Beside the vector, every row stores ``lexical`` (its title
and text, as encoded) with Milvus's BM25 function writing a sparse vector
(``SPARSE_INVERTED_INDEX``, metric BM25; Robertson & Zaragoza 2009,
https://doi.org/10.1561/1500000019), so a Milvus server ranks by BM25 with the
same analyzer. With Milvus Lite the mirror also keeps an inverted index
(:class:`LexicalIndex`) that scores as Milvus does (same tokens, Lucene idf,
k1 and b; a test checks the rankings agree) in well under a millisecond,
where Lite's own sparse search takes seconds on a 20k-row collection.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

MAX_TEXT_BYTES = 65_535  # Milvus VARCHAR limit
HUBNESS_MIN_ROWS = 64  # below this a collection is small enough to refresh its hubness on every write
HUBNESS_WRITE_TOLERANCE = 0.005  # a refresh rewrites a row only if its hubness moved more (x beta 0.25: 0.001 of cosine)

# The BM25 analyzer: Milvus's standard tokenizer (runs of letters, digits and "_") lower-cased, less English
# stop words (bm25s's list plus the question words queries open with). Milvus Lite 3.2 has no stemmer.
LEXICAL_STOPWORDS = (
    "a an and are as at be but by for if in into is it no not of on or such that the their then there these "
    "they this to was will with what which who whom how why when where does do did can"
).split()
LEXICAL_ANALYZER = {"tokenizer": "standard", "filter": ["lowercase", {"type": "stop", "stop_words": LEXICAL_STOPWORDS}]}
BM25_K1, BM25_B = 1.5, 0.75  # Milvus's defaults, written into the index so a server and the mirror agree
_LEXICAL_TOKEN = re.compile(r"\w+")
_STOP = frozenset(LEXICAL_STOPWORDS)


def lexical_tokens(text: str) -> list[str]:
    """The analyzer's tokens of ``text``, as Milvus's BM25 function makes them."""
    return [t for t in _LEXICAL_TOKEN.findall(text.lower()) if t not in _STOP]


def bm25_idf(n_docs: int, df: np.ndarray) -> np.ndarray:
    """Lucene's idf, ln(1 + (N - df + 0.5) / (df + 0.5)): always positive (what Milvus computes)."""
    return np.log1p((n_docs - df + 0.5) / (df + 0.5))


class LexicalIndex:
    """An in-process inverted index over the mirror's rows, scored by BM25 as Milvus scores it.

    Row numbers are the mirror's. The statistics (N, mean length, df) count the
    rows a search may return (its tenant and synthetic filter), which is what
    Milvus Lite computes them over.
    """

    def __init__(self):
        self.postings: dict[str, dict[int, int]] = {}  # term -> {row: tf}
        self.terms_of: dict[int, dict[str, int]] = {}  # row -> {term: tf}

    def put(self, row: int, text: str) -> int:
        """Index ``text`` as row ``row`` (replacing what it held); returns its length in tokens."""
        self.remove(row)
        counts: dict[str, int] = {}
        for t in lexical_tokens(text):
            counts[t] = counts.get(t, 0) + 1
        for t, c in counts.items():
            self.postings.setdefault(t, {})[row] = c
        self.terms_of[row] = counts
        return sum(counts.values())

    def remove(self, row: int) -> None:
        for t in self.terms_of.pop(row, ()):
            post = self.postings[t]
            del post[row]
            if not post:
                del self.postings[t]

    def renumber(self, new_row: dict[int, int]) -> None:
        """Follow a compaction of the mirror: row ``r`` is now ``new_row[r]``."""
        old = self.terms_of
        self.postings, self.terms_of = {}, {}
        for r, counts in old.items():
            for t, c in counts.items():
                self.postings.setdefault(t, {})[new_row[r]] = c
            self.terms_of[new_row[r]] = counts

    def scores(self, query: str, mask: np.ndarray, length: np.ndarray) -> np.ndarray:
        """BM25 of ``query`` against the rows where ``mask`` holds (0 where no term matches, -inf elsewhere).

        mask bool (N,), only rows that have a lexical text; length float (N,) tokens per row. float64 (N,).
        """
        out = np.zeros(len(mask), np.float64)
        n_docs = int(mask.sum())
        if n_docs:
            avgdl = max(float(length[mask].sum()) / n_docs, 1e-9)
            for term in lexical_tokens(query):  # a repeated query term counts each time, as Milvus's does
                post = self.postings.get(term)
                if not post:
                    continue
                rows = np.fromiter(post.keys(), np.int64, len(post))
                tf = np.fromiter(post.values(), np.float64, len(post))
                keep = mask[rows]
                rows, tf = rows[keep], tf[keep]
                if len(rows) == 0:
                    continue
                idf = float(bm25_idf(n_docs, np.float64(len(rows))))
                norm = BM25_K1 * (1 - BM25_B + BM25_B * length[rows] / avgdl)
                out[rows] += idf * tf * (BM25_K1 + 1) / (tf + norm)
        out[~mask] = -np.inf
        return out


@dataclass
class Hit:
    id: str  # chunk id, f"{doc_id}#{chunk}"
    doc_id: str
    chunk: int
    text: str
    score: float  # inner product of unit vectors: cosine similarity
    synthetic: bool = False
    tenant: str = ""
    title: str = ""
    hubness: float = 0.0  # mean cosine to the row's nearest stored neighbours (see the module docstring)
    vector: np.ndarray | None = None  # the stored vector, when the search asked for it (with_vectors)


@dataclass
class Row:
    id: str
    doc_id: str
    chunk: int
    text: str
    vector: np.ndarray
    title: str = ""
    tenant: str = ""
    synthetic: bool = False


def mean_of_top(sims: np.ndarray, k: int) -> np.ndarray:
    """Mean of each row's ``k`` largest finite values; -inf marks a slot that is not a neighbour. (N, M) -> (N,)."""
    out = np.zeros(len(sims), np.float32)
    kk = min(k, sims.shape[1])
    if kk == 0:
        return out
    top = np.partition(sims, sims.shape[1] - kk, axis=1)[:, -kk:]
    finite = np.isfinite(top)
    return (np.where(finite, top, 0.0).sum(1) / np.maximum(finite.sum(1), 1)).astype(np.float32)


def mean_top_similarity(vectors: np.ndarray, pool: np.ndarray, k: int, exclude: np.ndarray | None = None,
                        chunk: int = 1024) -> np.ndarray:
    """Mean of each vector's ``k`` largest inner products with the rows of ``pool``: its hubness.

    ``exclude[i]`` is a pool row that vector ``i`` must not count (itself), or -1.
    Fewer than ``k`` pool rows: the mean of those there are; none: 0.
    vectors (N, d), pool (M, d) float32 -> float32 (N,).
    """
    import torch  # topk is several times faster than numpy's partition over wide rows

    vectors = np.asarray(vectors, np.float32)
    pool_t = torch.from_numpy(np.ascontiguousarray(pool, dtype=np.float32))
    out = np.zeros(len(vectors), np.float32)
    m = len(pool_t) - (0 if exclude is None else 1)
    kk = min(k, m)
    if kk <= 0 or len(vectors) == 0:
        return out
    with torch.no_grad():
        for i in range(0, len(vectors), chunk):
            sims = torch.from_numpy(np.ascontiguousarray(vectors[i : i + chunk])) @ pool_t.T  # (n, M)
            if exclude is not None:
                ex = torch.as_tensor(np.asarray(exclude[i : i + chunk]), dtype=torch.long)
                rows = torch.nonzero(ex >= 0).flatten()
                sims[rows, ex[rows]] = -torch.inf
            top = torch.topk(sims, kk, dim=1).values  # (n, kk), all finite: kk <= the rows not excluded
            out[i : i + chunk] = (top.sum(1) / kk).numpy()
    return out


def collection_name(base: str, encoder_version: str) -> str:
    """Milvus names allow letters, digits and underscores."""
    return re.sub(r"[^A-Za-z0-9_]", "_", f"{base}__{encoder_version}")


def lexical_text(title: str, text: str) -> str:
    """What BM25 indexes for a chunk: what the encoder embeds (its title joins the text)."""
    from hybridrag.agents.rag.chunking import embed_text

    return embed_text(title, text)


def _truncate_utf8(text: str, limit: int) -> str:
    raw = text.encode("utf-8")
    return text if len(raw) <= limit else raw[:limit].decode("utf-8", "ignore")


class ExactMirror:
    """An in-process copy of a Milvus Lite collection, searched with one matrix product.

    Milvus Lite stays the system of record (durable, filterable); this mirror
    serves the searches. It is exact (the same inner products FLAT computes)
    and always consistent, because with Milvus Lite this process is the only
    writer: every upsert and delete goes through both. A Milvus server has
    several writers and its own fast indexes, so it gets no mirror.

    Its size is the collection's (which the memory manager's capacity bounds)
    plus the slots of deleted rows; those are compacted away whenever they
    outnumber the live rows, so it never holds more than twice the live rows
    (plus ``COMPACT_MIN`` slots).
    """

    COMPACT_MIN = 1024  # dead slots tolerated before a compaction, however few rows live

    def __init__(self, dim: int):
        self.dim = dim
        self.vectors = np.zeros((1024, dim), dtype=np.float32)
        self.alive = np.zeros(1024, dtype=bool)
        self.synthetic = np.zeros(1024, dtype=bool)
        self.tenant = np.zeros(1024, dtype=np.int32)
        self.hubness = np.zeros(1024, dtype=np.float32)
        self.lexlen = np.full(1024, -1.0, dtype=np.float32)  # tokens of the row's lexical text; -1: none
        self.meta: list[tuple] = []  # (id, doc_id, chunk, text, title, tenant, synthetic) per row
        self.row_of: dict[str, int] = {}
        self.rows_of_doc: dict[str, set[int]] = {}
        self.tenant_code: dict[str, int] = {}
        self.size = 0
        self.lexical = LexicalIndex()

    def _grow(self, need: int) -> None:
        cap = len(self.alive)
        if need <= cap:
            return
        new = max(need, cap * 2)
        for name in ("vectors", "alive", "synthetic", "tenant", "hubness", "lexlen"):
            old = getattr(self, name)
            grown = np.zeros((new,) + old.shape[1:], dtype=old.dtype)
            grown[: self.size] = old[: self.size]
            setattr(self, name, grown)

    def put(self, id: str, vector, doc_id: str, chunk: int, text: str, title: str, tenant: str, synthetic: bool,
            hubness: float = 0.0, lexical: str | None = None) -> None:
        """Store one row; ``lexical`` is the text its BM25 scores (None: not lexically indexed)."""
        row = self.row_of.get(id)
        if row is None:
            self._grow(self.size + 1)
            row = self.size
            self.size += 1
            self.meta.append(None)
            self.row_of[id] = row
        self.vectors[row] = vector
        self.alive[row] = True
        self.synthetic[row] = synthetic
        self.hubness[row] = hubness
        self.tenant[row] = self.tenant_code.setdefault(tenant, len(self.tenant_code))
        self.meta[row] = (id, doc_id, int(chunk), text, title, tenant, bool(synthetic))
        self.rows_of_doc.setdefault(doc_id, set()).add(row)
        if lexical is not None:
            self.lexlen[row] = self.lexical.put(row, lexical)
        else:
            self.lexical.remove(row)
            self.lexlen[row] = -1.0

    def remove(self, id: str) -> bool:
        row = self.row_of.pop(id, None)
        if row is None:
            return False
        self.alive[row] = False
        self.vectors[row] = 0.0
        self.lexical.remove(row)
        self.lexlen[row] = -1.0
        doc_id = self.meta[row][1]
        rows = self.rows_of_doc.get(doc_id)
        if rows is not None:
            rows.discard(row)
            if not rows:
                del self.rows_of_doc[doc_id]
        self.meta[row] = None
        if self.dead() > max(self.COMPACT_MIN, len(self.row_of)):
            self.compact()
        return True

    def dead(self) -> int:
        """Slots of deleted rows not yet compacted away."""
        return self.size - len(self.row_of)

    def compact(self) -> None:
        """Move the live rows to the front, in their order, and renumber them; row numbers change."""
        keep = np.nonzero(self.alive[: self.size])[0]
        self.lexical.renumber({int(r): i for i, r in enumerate(keep)})
        for name in ("vectors", "alive", "synthetic", "tenant", "hubness", "lexlen"):
            arr = getattr(self, name)
            moved = np.zeros((max(1024, 2 * len(keep)),) + arr.shape[1:], dtype=arr.dtype)
            moved[: len(keep)] = arr[keep]
            setattr(self, name, moved)
        self.meta = [self.meta[r] for r in keep]
        self.size = len(keep)
        self.row_of = {m[0]: i for i, m in enumerate(self.meta)}
        self.rows_of_doc = {}
        for i, m in enumerate(self.meta):
            self.rows_of_doc.setdefault(m[1], set()).add(i)

    def stale_ids(self, doc_id: str, n_chunks: int) -> list[str]:
        return [self.meta[r][0] for r in self.rows_of_doc.get(doc_id, ()) if self.alive[r] and self.meta[r][2] >= n_chunks]

    def count(self) -> int:
        return len(self.row_of)

    def neighbour_pool(self, tenant: str, skip_ids: set[str] = frozenset()) -> np.ndarray:
        """Row numbers of the live real rows of ``tenant``, less ``skip_ids``: whom hubness is measured against."""
        n = self.size
        if tenant not in self.tenant_code:
            return np.zeros(0, dtype=np.int64)
        mask = self.alive[:n] & ~self.synthetic[:n] & (self.tenant[:n] == self.tenant_code[tenant])
        for i in skip_ids:
            r = self.row_of.get(i)
            if r is not None:
                mask[r] = False
        return np.nonzero(mask)[0]

    def _mask(self, tenant: str, include_synthetic: bool) -> np.ndarray:
        n = self.size
        mask = self.alive[:n] & (self.tenant[:n] == self.tenant_code[tenant])
        if not include_synthetic:
            mask &= ~self.synthetic[:n]
        return mask

    def search(self, queries: np.ndarray, top_k: int, tenant: str, include_synthetic: bool,
               with_vectors: bool = False) -> list[list[Hit]]:
        n = self.size
        if n == 0 or tenant not in self.tenant_code:
            return [[] for _ in range(len(queries))]
        scores = np.asarray(queries, dtype=np.float32) @ self.vectors[:n].T  # (Q, N)
        mask = self._mask(tenant, include_synthetic)
        scores[:, ~mask] = -np.inf
        return [self._top_hits(row, top_k, with_vectors) for row in scores]

    def lexical_search(self, queries: Sequence[str], top_k: int, tenant: str, include_synthetic: bool,
                       with_vectors: bool = False) -> list[list[Hit]]:
        """BM25 top-k per query text, among the rows with a lexical text and at least one matching term."""
        n = self.size
        if n == 0 or tenant not in self.tenant_code:
            return [[] for _ in queries]
        mask = self._mask(tenant, include_synthetic) & (self.lexlen[:n] >= 0)
        out = []
        for q in queries:
            scores = self.lexical.scores(q, mask, self.lexlen[:n])
            scores[scores <= 0] = -np.inf
            out.append(self._top_hits(scores, top_k, with_vectors))
        return out

    def _top_hits(self, scores: np.ndarray, top_k: int, with_vectors: bool) -> list[Hit]:
        """The ``top_k`` finite scores of one query (N,), best first, as hits."""
        finite = int(np.isfinite(scores).sum())
        k = min(top_k, finite)
        if k == 0:
            return []
        top = np.argpartition(-scores, k - 1)[:k]
        hits = []
        for r in top[np.argsort(-scores[top], kind="stable")]:
            id_, doc_id, chunk, text, title, ten, synth = self.meta[r]
            hits.append(Hit(id=id_, doc_id=doc_id, chunk=chunk, text=text, score=float(scores[r]),
                            synthetic=synth, tenant=ten, title=title, hubness=float(self.hubness[r]),
                            vector=self.vectors[r].copy() if with_vectors else None))
        return hits


@dataclass(frozen=True)
class ServingInfo:
    """What the serving alias points at: a collection and the encoder that built it."""

    collection: str
    encoder: str  # "original" or "hybrid"
    encoder_version: str
    checkpoint: str  # hybrid checkpoint path; empty for the original encoder
    dim: int


def serving_alias(base: str) -> str:
    """The alias that names the serving collection: the base name itself."""
    return re.sub(r"[^A-Za-z0-9_]", "_", base)


def milvus_client(uri: str, token: str = ""):
    from pymilvus import MilvusClient

    if "://" not in uri:
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
    return MilvusClient(uri, token=token) if token else MilvusClient(uri)


def resolve_serving(uri: str, base: str, token: str = "", client=None) -> ServingInfo | None:
    """The collection the serving alias points at, or None for a deployment that has none yet."""
    c = client or milvus_client(uri, token)
    alias = serving_alias(base)
    if alias not in c.list_aliases().get("aliases", []):
        return None
    name = c.describe_alias(alias)["collection_name"]
    props = c.describe_collection(name).get("properties", {}) or {}
    if "hybridrag.encoder_version" not in props:
        raise ValueError(f"collection {name} behind alias {alias} carries no encoder version")
    return ServingInfo(name, props.get("hybridrag.encoder", ""), props["hybridrag.encoder_version"],
                       props.get("hybridrag.checkpoint", ""), int(props.get("hybridrag.dim", 0)))


def deployment_collections(client, base: str) -> list[str]:
    """The collections of deployment ``base`` (one per encoder version), oldest first.

    Created order comes from the ``hybridrag.created_at`` property; a collection
    made before it was recorded counts as the oldest.
    """
    prefix = collection_name(base, "")
    created = {}
    for name in client.list_collections():
        if name.startswith(prefix):
            props = client.describe_collection(name).get("properties", {}) or {}
            created[name] = float(props.get("hybridrag.created_at", 0.0))
    return sorted(created, key=lambda n: (created[n], n))


def prune_collections(client, base: str, keep: int) -> list[str]:
    """Drop all but the ``keep`` newest collections of ``base``, never one an alias points at; returns those dropped.

    After a re-index the old collection is the fallback while batches that
    started on it finish and other workers follow the alias; a collection
    ``keep`` promotions old serves nobody.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    names = deployment_collections(client, base)
    aliased = {client.describe_alias(a)["collection_name"] for a in client.list_aliases().get("aliases", [])}
    dropped = [n for n in names[: max(0, len(names) - keep)] if n not in aliased]
    for name in dropped:
        client.drop_collection(name)
        log.info("dropped collection %s (keeping the %d newest of %s)", name, keep, base)
    return dropped


class VectorStore:
    """Chunks and their vectors for one encoder version.

    The collection records, as properties, the encoder that built it (kind,
    version, checkpoint), so a worker that resolves the serving alias knows
    which encoder its queries need.
    """

    OUTPUT_FIELDS = ["doc_id", "chunk", "text", "title", "tenant", "synthetic"]

    def __init__(self, uri: str, base: str, encoder_version: str, dim: int, token: str = "", *,
                 encoder: str = "", checkpoint: str = "", hubness_k: int = 20, hubness_refresh_growth: float = 1.5,
                 generation: str = ""):
        self.uri = uri
        self.base = base
        self.dim = dim
        self.encoder_version = encoder_version
        self.encoder_kind = encoder
        self.checkpoint = checkpoint
        # a generation names a second collection for the same encoder: a rebuild into today's schema
        self.name = collection_name(base, encoder_version) + (f"__{generation}" if generation else "")
        self.client = milvus_client(uri, token)
        # MilvusClient is not documented thread-safe; the agents call it from executors
        self._lock = threading.Lock()
        # mirror searches take only this one, so a query never waits behind a Milvus call;
        # mirror writes take it inside _lock
        self._mirror_lock = threading.Lock()
        self.hubness_k = hubness_k  # 0: no hubness (every row stores 0)
        self.hubness_refresh_growth = hubness_refresh_growth
        self._ensure_collection()
        self._read_schema()
        self.mirror: ExactMirror | None = None
        if "://" not in uri:
            self.mirror = ExactMirror(dim)
            self._load_mirror()

    def _read_schema(self) -> None:
        desc = self.client.describe_collection(self.name)
        # a collection created before the field existed serves hubness 0 (the cosine alone) until re-indexed
        self.has_hubness = "hubness" in {f["name"] for f in desc.get("fields", [])}
        if not self.has_hubness:
            log.warning("collection %s stores no hubness; the adaptive retriever's hubness signal is off for it "
                        "until it is re-indexed (`hybridrag reindex`)", self.name)
        self.output_fields = self.OUTPUT_FIELDS + (["hubness"] if self.has_hubness else [])
        self.has_lexical = "sparse" in {f["name"] for f in desc.get("fields", [])}
        if not self.has_lexical:
            log.warning("collection %s has no lexical (BM25) index; hybrid and lexical retrieval serve the dense "
                        "search alone for it until it is re-indexed (`hybridrag reindex`)", self.name)
        props = desc.get("properties", {}) or {}
        self.hubness_rows = int(props.get("hybridrag.hubness_rows", 0))  # rows at the last full refresh

    def _load_mirror(self) -> None:
        assert self.mirror is not None
        fields = ["id", "vector"] + self.output_fields + (["lexical"] if self.has_lexical else [])
        with self._lock:
            it = self.client.query_iterator(self.name, batch_size=2000, filter="", output_fields=fields)
            while True:
                batch = it.next()
                if not batch:
                    it.close()
                    break
                for r in batch:
                    self.mirror.put(r["id"], np.asarray(r["vector"], np.float32), r["doc_id"], r["chunk"], r["text"],
                                    r["title"], r["tenant"], r["synthetic"], float(r.get("hubness") or 0.0),
                                    r.get("lexical"))

    def _ensure_collection(self) -> None:
        from pymilvus import DataType, Function, FunctionType, MilvusClient

        with self._lock:
            if self.client.has_collection(self.name):
                # a reopened collection starts released; searches need it loaded
                self.client.load_collection(self.name)
                return
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=300)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
            schema.add_field("doc_id", DataType.VARCHAR, max_length=256)
            schema.add_field("chunk", DataType.INT64)
            schema.add_field("text", DataType.VARCHAR, max_length=MAX_TEXT_BYTES)
            schema.add_field("title", DataType.VARCHAR, max_length=1024)
            schema.add_field("tenant", DataType.VARCHAR, max_length=64)
            schema.add_field("synthetic", DataType.BOOL)
            schema.add_field("encoder_version", DataType.VARCHAR, max_length=128)
            schema.add_field("indexed_at", DataType.DOUBLE)
            schema.add_field("hubness", DataType.FLOAT)
            schema.add_field("lexical", DataType.VARCHAR, max_length=MAX_TEXT_BYTES, enable_analyzer=True,
                             analyzer_params=LEXICAL_ANALYZER)
            schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
            schema.add_function(Function(name="bm25", function_type=FunctionType.BM25,
                                         input_field_names=["lexical"], output_field_names=["sparse"]))
            index = self.client.prepare_index_params()
            # FLAT is exact and the only index Milvus Lite has; on a server, HNSW scales further
            index_type = "FLAT" if "://" not in self.uri else "HNSW"
            params = {} if index_type == "FLAT" else {"M": 16, "efConstruction": 200}
            index.add_index("vector", index_type=index_type, metric_type="IP", params=params)
            index.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25",
                            params={"bm25_k1": BM25_K1, "bm25_b": BM25_B})
            self.client.create_collection(self.name, schema=schema, index_params=index)
            self.client.alter_collection_properties(self.name, properties={
                "hybridrag.encoder": self.encoder_kind,
                "hybridrag.encoder_version": self.encoder_version,
                "hybridrag.checkpoint": self.checkpoint,
                "hybridrag.dim": str(self.dim),
                "hybridrag.created_at": repr(time.time()),
            })
            log.info("created collection %s (dim %d, %s)", self.name, self.dim, index_type)

    def upsert(self, rows: Sequence[Row]) -> int:
        """Write rows (by id: a replay changes nothing), with their hubness estimated from the stored rows."""
        if not rows:
            return 0
        hubness = (self.estimate_hubness(rows) if self.has_hubness and self.hubness_k > 0
                   else np.zeros(len(rows), np.float32))
        now = time.time()
        data = [
            {
                "id": r.id,
                "vector": np.asarray(r.vector, dtype=np.float32).tolist(),
                "doc_id": r.doc_id,
                "chunk": int(r.chunk),
                "text": _truncate_utf8(r.text, MAX_TEXT_BYTES),
                "title": _truncate_utf8(r.title, 1024),
                "tenant": r.tenant,
                "synthetic": bool(r.synthetic),
                "encoder_version": self.encoder_version,
                "indexed_at": now,
                **({"hubness": float(h)} if self.has_hubness else {}),
                **({"lexical": _truncate_utf8(lexical_text(r.title, r.text), MAX_TEXT_BYTES)} if self.has_lexical else {}),
            }
            for r, h in zip(rows, hubness)
        ]
        with self._lock:
            self.client.upsert(self.name, data)
            if self.mirror is not None:
                with self._mirror_lock:
                    for r, d, h in zip(rows, data, hubness):
                        self.mirror.put(r.id, np.asarray(r.vector, np.float32), r.doc_id, r.chunk, d["text"],
                                        d["title"], r.tenant, bool(r.synthetic), float(h), d.get("lexical"))
        if self.has_hubness and self.hubness_k > 0 and self.hubness_refresh_growth > 0 and self._refresh_due():
            self.refresh_hubness()
        return len(data)

    def _refresh_due(self) -> bool:
        """The collection has grown by ``hubness_refresh_growth`` since the last refresh (or is still tiny)."""
        n = self.count()
        if n < HUBNESS_MIN_ROWS:
            return True
        if n >= self.hubness_refresh_growth * self.hubness_rows and self.mirror is None:
            # on a server other workers write and refresh too: the collection's property has the last refresh
            with self._lock:
                props = self.client.describe_collection(self.name).get("properties", {}) or {}
            self.hubness_rows = max(self.hubness_rows, int(props.get("hybridrag.hubness_rows", 0)))
        return n >= self.hubness_refresh_growth * self.hubness_rows

    # ------------------------------------------------------------------ hubness

    def estimate_hubness(self, rows: Sequence[Row]) -> np.ndarray:
        """Each new row's mean cosine to its nearest real rows: those stored (other than the batch) and the batch's own."""
        vecs = np.stack([np.asarray(r.vector, np.float32) for r in rows])  # (B, d)
        out = np.zeros(len(rows), np.float32)
        batch_ids = {r.id for r in rows}
        k = self.hubness_k
        by_tenant: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            by_tenant.setdefault(r.tenant, []).append(i)
        for tenant, idx in by_tenant.items():
            v = vecs[idx]
            real = [j for j, i in enumerate(idx) if not rows[i].synthetic]
            # similarities to the batch's own real rows, less each row itself
            own = v @ v[real].T if real else np.zeros((len(idx), 0), np.float32)  # (b, r)
            for pos, j in enumerate(real):
                own[j, pos] = -np.inf
            if self.mirror is not None:
                with self._lock:
                    pool = self.mirror.neighbour_pool(tenant, batch_ids)
                    stored = v @ self.mirror.vectors[pool].T  # (b, P)
            else:
                stored = self._server_neighbour_scores(v, tenant, [batch_ids] * len(idx))
            out[idx] = mean_of_top(np.concatenate([stored, own], axis=1), k)
        return out

    def _server_neighbour_scores(self, vectors: np.ndarray, tenant: str, skip: Sequence[set[str]]) -> np.ndarray:
        """Cosines (n, k+1) of each vector to its nearest real rows of ``tenant`` on the server, less the ids in
        ``skip[i]``; -inf pads. Asks for ids and distances only: no text crosses the wire."""
        k = self.hubness_k
        with self._lock:
            res = self.client.search(self.name, data=np.asarray(vectors, np.float32).tolist(), limit=k + 1,
                                     filter=_filter_expr(tenant, False), output_fields=[])
        out = np.full((len(vectors), k + 1), -np.inf, np.float32)
        for i, hits in enumerate(res):
            scores = [float(h["distance"]) for h in hits if h["id"] not in skip[i]]
            out[i, : len(scores)] = scores
        return out

    def refresh_hubness(self) -> int:
        """Recompute every row's hubness against the whole collection; returns the rows updated.

        Computed outside the lock, so searches go on; written back in slices with a
        partial update, which never recreates a row deleted meanwhile.
        """
        if not self.has_hubness or self.hubness_k <= 0:
            return 0
        t0 = time.perf_counter()
        ids: list[str] = []
        values: list[np.ndarray] = []
        previous: list[np.ndarray] = []  # the values stored now, to skip rows that did not move
        if self.mirror is not None:
            with self._lock:
                m = self.mirror
                n = m.size
                snapshot = {t: (np.nonzero(m.alive[:n] & (m.tenant[:n] == code))[0], m.neighbour_pool(t))
                            for t, code in m.tenant_code.items()}
                vectors = m.vectors[:n].copy()
                stored = m.hubness[:n].copy()
                row_ids = [m.meta[r][0] if m.meta[r] else "" for r in range(n)]
            for rows, pool in snapshot.values():
                if len(rows) == 0:
                    continue
                # each row's own position in its (sorted) pool, or -1 for a synthetic row, which is not in it
                exclude = np.full(len(rows), -1)
                if len(pool):
                    at = np.minimum(np.searchsorted(pool, rows), len(pool) - 1)
                    exclude = np.where(pool[at] == rows, at, -1)
                values.append(mean_top_similarity(vectors[rows], vectors[pool], self.hubness_k, exclude))
                previous.append(stored[rows])
                ids.extend(row_ids[r] for r in rows)
        else:
            with self._lock:
                it = self.client.query_iterator(self.name, batch_size=1000, filter="",
                                                output_fields=["id", "vector", "tenant", "hubness"])
            while True:
                with self._lock:
                    batch = it.next()
                if not batch:
                    it.close()
                    break
                out = np.zeros(len(batch), np.float32)
                for tenant in {r["tenant"] for r in batch}:
                    idx = [i for i, r in enumerate(batch) if r["tenant"] == tenant]
                    vecs = np.array([batch[i]["vector"] for i in idx], np.float32)
                    sims = self._server_neighbour_scores(vecs, tenant, [{batch[i]["id"]} for i in idx])
                    out[idx] = mean_of_top(sims, self.hubness_k)
                values.append(out)
                previous.append(np.array([r.get("hubness") or 0.0 for r in batch], np.float32))
                ids.extend(r["id"] for r in batch)
        hub = np.concatenate(values) if values else np.zeros(0, np.float32)
        old = np.concatenate(previous) if previous else np.full(len(ids), np.nan, np.float32)
        # most rows move by a hair between refreshes; rewriting only those that moved halves the writes
        moved = np.nonzero(~(np.abs(hub - old) <= HUBNESS_WRITE_TOLERANCE))[0]
        for i in range(0, len(moved), 2000):
            part = moved[i : i + 2000]
            self._write_hubness([ids[j] for j in part], hub[part])
        self.hubness_rows = len(ids)
        with self._lock:
            self.client.alter_collection_properties(self.name, properties={"hybridrag.hubness_rows": str(len(ids))})
        log.info("hubness of %s refreshed: %d rows in %.1fs", self.name, len(ids), time.perf_counter() - t0)
        return len(ids)

    def _write_hubness(self, ids: Sequence[str], values: np.ndarray) -> None:
        with self._lock:
            if self.mirror is not None:
                # Milvus Lite has one writer, this process: the mirror knows which rows still exist
                live = [(i, float(v)) for i, v in zip(ids, values) if i in self.mirror.row_of]
                for i, v in live:
                    self.mirror.hubness[self.mirror.row_of[i]] = v
            else:
                live = [(i, float(v)) for i, v in zip(ids, values)]
            if not live:
                return
            data = [{"id": i, "hubness": v} for i, v in live]
            try:
                self.client.upsert(self.name, data, partial_update=True)
            except Exception:  # another worker deleted a row of the slice: update the rest one by one
                for d in data:
                    try:
                        self.client.upsert(self.name, [d], partial_update=True)
                    except Exception:
                        log.debug("hubness of %s not written (row gone)", d["id"])

    def delete_stale_chunks(self, doc_chunks: dict[str, int]) -> None:
        """Drop chunks past the new end of re-ingested documents (a shorter new version)."""
        if not doc_chunks:
            return
        # ids are validated to a safe charset by the schemas, so quoting is enough
        if self.mirror is not None:
            # the mirror knows exactly which rows are stale: delete those ids, usually none
            ids = [i for d, n in doc_chunks.items() for i in self.mirror.stale_ids(d, n)]
            self.delete(ids)
            return
        expr = " or ".join(f'(doc_id == "{d}" and chunk >= {n})' for d, n in doc_chunks.items())
        with self._lock:
            self.client.delete(self.name, filter=expr)

    def delete(self, ids: list[str]) -> int:
        if not ids:
            return 0
        with self._lock:
            res = self.client.delete(self.name, ids=list(ids))
            if self.mirror is not None:
                with self._mirror_lock:
                    for i in ids:
                        self.mirror.remove(i)
        return int(res.get("delete_count", len(ids))) if isinstance(res, dict) else len(ids)

    def search(
        self, vectors: np.ndarray, top_k: int, *, tenant: str | Sequence[str] = "", include_synthetic: bool = True,
        with_vectors: bool = False,
    ) -> list[list[Hit]]:
        """Top-k hits for each row of ``vectors`` (one search call for the whole batch).

        ``tenant`` is one tenant for all rows or one per row; a query only ever
        sees documents of its own tenant. ``with_vectors`` returns each hit's
        stored vector too (the adaptive retriever's query-bank signal needs them).
        """
        n = len(vectors)
        if n == 0:
            return []
        out: list[list[Hit] | None] = [None] * n
        for t, rows in _tenant_groups(tenant, n).items():  # one batched call per distinct filter (usually one)
            if self.mirror is not None:
                with self._mirror_lock:
                    res_hits = self.mirror.search(np.asarray(vectors)[rows], top_k, t, include_synthetic, with_vectors)
                for i, hits in zip(rows, res_hits):
                    out[i] = hits
                continue
            expr = _filter_expr(t, include_synthetic)
            with self._lock:
                res = self.client.search(
                    self.name,
                    data=[np.asarray(vectors[i], dtype=np.float32).tolist() for i in rows],
                    limit=top_k,
                    filter=expr,
                    output_fields=self.output_fields + (["vector"] if with_vectors else []),
                )
            for i, hits in zip(rows, res):
                out[i] = [_milvus_hit(h, float(h["distance"]), with_vectors) for h in hits]
        return [o or [] for o in out]

    def lexical_search(
        self, texts: Sequence[str], top_k: int, *, tenant: str | Sequence[str] = "", include_synthetic: bool = True,
        with_vectors: bool = False,
    ) -> list[list[Hit]]:
        """BM25 top-k per query text (``score`` is the BM25 score); [] for each when the collection has no
        lexical index. The tenant and synthetic filters are the dense search's."""
        n = len(texts)
        if n == 0:
            return []
        if not self.has_lexical:
            return [[] for _ in range(n)]
        out: list[list[Hit]] = [[] for _ in range(n)]
        for t, rows in _tenant_groups(tenant, n).items():
            if self.mirror is not None:
                with self._mirror_lock:
                    res_hits = self.mirror.lexical_search([texts[i] for i in rows], top_k, t, include_synthetic,
                                                          with_vectors)
            else:
                res_hits = self._server_lexical_search([texts[i] for i in rows], top_k, t, include_synthetic,
                                                       with_vectors)
            for i, hits in zip(rows, res_hits):
                out[i] = hits
        return out

    def _server_lexical_search(self, texts: Sequence[str], top_k: int, tenant: str, include_synthetic: bool,
                               with_vectors: bool) -> list[list[Hit]]:
        expr = _filter_expr(tenant, include_synthetic)
        # a query with no indexed term has no sparse vector to search with: it matches nothing
        live = [i for i, t in enumerate(texts) if lexical_tokens(t)]
        out: list[list[Hit]] = [[] for _ in texts]
        if not live:
            return out
        with self._lock:
            res = self.client.search(self.name, data=[texts[i] for i in live], anns_field="sparse", limit=top_k,
                                     filter=expr, search_params={"metric_type": "BM25"},
                                     output_fields=self.output_fields + (["vector"] if with_vectors else []))
        for i, hits in zip(live, res):
            # Milvus Lite reports BM25 as a negative distance and a server as a positive one; the score is >= 0
            out[i] = [_milvus_hit(h, abs(float(h["distance"])), with_vectors) for h in hits]
        return out

    def server_lexical_search(self, texts: Sequence[str], top_k: int, tenant: str = "",
                              include_synthetic: bool = True) -> list[list[Hit]]:
        """Milvus's own BM25 search, even where the mirror serves: what the mirror's ranking is checked against."""
        return self._server_lexical_search(texts, top_k, tenant, include_synthetic, False)

    def sample_rows(self, n: int, seed: int = 0) -> tuple[list[str], np.ndarray, list[str]]:
        """Up to ``n`` real (not synthetic) rows: (lexical texts, vectors (n, d), doc ids); random with the
        mirror, the first ``n`` a server returns otherwise. What the fusion weight is chosen from."""
        if self.mirror is not None:
            with self._mirror_lock:
                m = self.mirror
                live = np.nonzero(m.alive[: m.size] & ~m.synthetic[: m.size] & (m.lexlen[: m.size] >= 0))[0]
                pick = np.random.default_rng(seed).permutation(live)[:n]
                rows = [(lexical_text(m.meta[r][4], m.meta[r][3]), m.vectors[r].copy(), m.meta[r][1]) for r in pick]
        else:
            with self._lock:
                got = self.client.query(self.name, filter="synthetic == false", limit=n,
                                        output_fields=["lexical", "vector", "doc_id"])
            rows = [(r["lexical"], np.asarray(r["vector"], np.float32), r["doc_id"]) for r in got]
        vecs = np.stack([r[1] for r in rows]) if rows else np.zeros((0, self.dim), np.float32)
        return [r[0] for r in rows], vecs, [r[2] for r in rows]

    # ------------------------------------------------------------------ fusion weight

    FUSION_PROPS = ("hybridrag.fusion_weight", "hybridrag.fusion_check", "hybridrag.fusion_rows")

    def fusion_state(self) -> tuple[float, float, int] | None:
        """(weight, self-check nDCG@10, rows when chosen) from the collection's properties; None if never chosen."""
        with self._lock:
            props = self.client.describe_collection(self.name).get("properties", {}) or {}
        if self.FUSION_PROPS[0] not in props:
            return None
        return (float(props[self.FUSION_PROPS[0]]), float(props.get(self.FUSION_PROPS[1], 0.0)),
                int(props.get(self.FUSION_PROPS[2], 0)))

    def set_fusion_state(self, weight: float, check: float, rows: int) -> None:
        with self._lock:
            self.client.alter_collection_properties(self.name, properties=dict(zip(
                self.FUSION_PROPS, (repr(float(weight)), repr(float(check)), str(int(rows))))))

    def ids(self) -> list[str]:
        """Every row id, for a re-index snapshot."""
        if self.mirror is not None:
            with self._lock:
                return list(self.mirror.row_of)
        out: list[str] = []
        with self._lock:
            it = self.client.query_iterator(self.name, batch_size=5000, filter="", output_fields=["id"])
            while batch := it.next():
                out.extend(r["id"] for r in batch)
            it.close()
        return out

    def get(self, ids: Sequence[str]) -> list[dict]:
        """The stored rows (text, title, doc_id, chunk, tenant, synthetic) of ``ids`` that still exist."""
        if not ids:
            return []
        if self.mirror is not None:
            with self._lock:
                rows = [self.mirror.meta[r] for i in ids if (r := self.mirror.row_of.get(i)) is not None]
            return [dict(zip(("id", "doc_id", "chunk", "text", "title", "tenant", "synthetic"), m)) for m in rows]
        with self._lock:
            return list(self.client.get(self.name, ids=list(ids), output_fields=["id"] + self.OUTPUT_FIELDS))

    def point_alias(self) -> None:
        """Make this collection the serving one: one atomic alias switch, which searches by name never see."""
        alias = serving_alias(self.base)
        with self._lock:
            if alias in self.client.list_aliases().get("aliases", []):
                self.client.alter_alias(self.name, alias)
            else:
                self.client.create_alias(self.name, alias)
        log.info("serving alias %s -> %s", alias, self.name)

    def drop(self) -> None:
        with self._lock:
            self.client.drop_collection(self.name)

    def collections(self) -> list[str]:
        """Every collection of this deployment (this one's siblings for other encoder versions), oldest first."""
        with self._lock:
            return deployment_collections(self.client, self.base)

    def drop_old_collections(self, keep: int) -> list[str]:
        """Keep this deployment's ``keep`` newest collections and any an alias names; drop the rest."""
        with self._lock:
            return prune_collections(self.client, self.base, keep)

    def recreate(self) -> None:
        """Start this collection over, empty (a re-index that a crash interrupted leaves rows behind)."""
        self.drop()
        self._ensure_collection()
        self._read_schema()
        if self.mirror is not None:
            self.mirror = ExactMirror(self.dim)

    def texts(self, doc_ids: Sequence[str]) -> dict[str, str]:
        """The text of each stored document's first chunk, by doc id; ids not stored are left out.

        For readers that know documents by id only (the continual learner replays
        important documents the memory holds no text sample of).
        """
        wanted = list(dict.fromkeys(doc_ids))
        if not wanted:
            return {}
        out: dict[str, str] = {}
        if self.mirror is not None:
            with self._lock:
                for d in wanted:
                    rows = [r for r in self.mirror.rows_of_doc.get(d, ()) if self.mirror.alive[r]]
                    if rows:
                        out[d] = self.mirror.meta[min(rows, key=lambda r: self.mirror.meta[r][2])][3]
            return out
        # ids are validated to a safe charset by the schemas, so quoting is enough
        quoted = ", ".join(f'"{d}"' for d in wanted)
        with self._lock:
            rows = self.client.query(self.name, filter=f"doc_id in [{quoted}]", output_fields=["doc_id", "chunk", "text"])
        first: dict[str, tuple[int, str]] = {}
        for r in rows:
            if r["doc_id"] not in first or r["chunk"] < first[r["doc_id"]][0]:
                first[r["doc_id"]] = (int(r["chunk"]), r["text"])
        return {d: t for d, (_, t) in first.items()}

    def count(self) -> int:
        if self.mirror is not None:
            return self.mirror.count()
        with self._lock:
            res = self.client.query(self.name, filter="", output_fields=["count(*)"])
        return int(res[0]["count(*)"])

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # closing is best effort at shutdown
            log.debug("milvus close failed", exc_info=True)


def _tenant_groups(tenant: str | Sequence[str], n: int) -> dict[str, list[int]]:
    """A batch's row indices by tenant: one store call per distinct filter."""
    groups: dict[str, list[int]] = {}
    for i, t in enumerate([tenant] * n if isinstance(tenant, str) else list(tenant)):
        groups.setdefault(t, []).append(i)
    return groups


def _filter_expr(tenant: str, include_synthetic: bool) -> str:
    return f'tenant == "{tenant}"' + ("" if include_synthetic else " and synthetic == false")


def _milvus_hit(h: dict, score: float, with_vectors: bool) -> Hit:
    """A Hit from one row of a Milvus search result (dense or BM25: the caller gives the score)."""
    e = h["entity"]
    return Hit(id=h["id"], doc_id=e["doc_id"], chunk=int(e["chunk"]), text=e["text"], score=score,
               synthetic=bool(e["synthetic"]), tenant=e["tenant"], title=e["title"],
               hubness=float(e.get("hubness") or 0.0),
               vector=np.asarray(e["vector"], np.float32) if with_vectors else None)
