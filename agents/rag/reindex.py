"""Re-indexing without stale vectors: rebuild the collection for a new encoder, then swap the alias.

A new encoder version makes every stored vector stale: its vectors live in
another space. So vectors are versioned by collection (``<base>__<version>``),
and the serving alias (``<base>``) names the collection that answers queries.
On a promotion:

1. a background job re-encodes the corpus into the new version's collection
   from the stored text, a slice at a time;
2. meanwhile every write goes to both collections (ingest is re-encoded with
   both encoders, deletes go to both), so the new one misses nothing;
3. once the copy is complete and the row counts agree, one step switches the
   alias and the worker's serving pair (encoder, collection) together.

Queries read the serving pair once per batch, so a batch is encoded with the
version that built the collection it searches, before and after the swap,
and none fails: the old collection stays in place (the fallback) while
batches that started on it finish.

The worker runs the slices and the dual writes in its ingest lane (one
thread), so they are ordered; deletes come from the memory lane and take
:attr:`Reindex.lock`.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Sequence

from hybridrag.agents.rag.chunking import embed_text
from hybridrag.models.encoders import Encoder
from hybridrag.agents.rag.store import Row, VectorStore

log = logging.getLogger(__name__)


class ReindexError(RuntimeError):
    pass


class Reindex:
    """One rebuild of the serving collection (``source``) into ``target`` with ``encoder``."""

    def __init__(self, source: VectorStore, target: VectorStore, encoder: Encoder, batch: int = 256):
        if target.encoder_version != encoder.version:
            raise ValueError(f"target collection {target.name} is for {target.encoder_version}, not {encoder.version}")
        self.source = source
        self.target = target
        self.encoder = encoder
        self.batch = batch
        self.lock = threading.RLock()  # the worker holds it across an ingest and its dual write
        self.pending = source.ids()  # the snapshot; writes after it reach the target through the dual writes
        self.total = len(self.pending)
        self.copied = 0
        self.started = time.monotonic()

    @property
    def done(self) -> bool:
        return not self.pending

    def copy_slice(self) -> int:
        """Re-encode the next slice of the snapshot from the stored text; returns the rows written."""
        with self.lock:
            ids, self.pending = self.pending[: self.batch], self.pending[self.batch :]
            # rows deleted since the snapshot are gone from the source and are skipped
            rows = self.source.get(ids)
            vecs = self.encoder.encode([embed_text(r["title"], r["text"]) for r in rows])
            self.target.upsert([
                Row(r["id"], r["doc_id"], int(r["chunk"]), r["text"], v, title=r["title"], tenant=r["tenant"],
                    synthetic=bool(r["synthetic"]))
                for r, v in zip(rows, vecs)
            ])
            self.copied += len(rows)
            return len(rows)

    def write_rows(self, rows: Sequence[Row]) -> None:
        """Dual write: rows just written to the source, re-encoded for the target."""
        if not rows:
            return
        with self.lock:
            vecs = self.encoder.encode([embed_text(r.title, r.text) for r in rows])
            self.target.upsert([
                Row(r.id, r.doc_id, r.chunk, r.text, v, title=r.title, tenant=r.tenant, synthetic=r.synthetic)
                for r, v in zip(rows, vecs)
            ])

    def delete(self, ids: list[str]) -> int:
        """Dual delete, from both collections."""
        with self.lock:
            n = self.source.delete(ids)
            self.target.delete(ids)
            return n

    def delete_stale_chunks(self, doc_chunks: dict[str, int]) -> None:
        with self.lock:
            self.target.delete_stale_chunks(doc_chunks)

    def verify(self) -> tuple[int, int]:
        """Row counts of source and target; they must agree before the swap."""
        with self.lock:
            src, dst = self.source.count(), self.target.count()
        if src != dst:
            raise ReindexError(f"re-index of {self.target.name} has {dst} rows, the source {src}")
        return src, dst

    def progress(self) -> dict[str, float]:
        return {"rows": float(self.total), "copied": float(self.copied),
                "seconds": round(time.monotonic() - self.started, 3)}
