"""The worker's web pages: ``/health`` (ready, encoder, collection, rows, retrieval) and ``/metrics`` (Prometheus)."""

from __future__ import annotations

from hybridrag.agents.app import app
from hybridrag.agents.kafka import metrics
from hybridrag.agents.runtime import runtime


@app.page("/health")
async def health(web, request):
    ready = runtime.is_ready()
    body = {
        "status": "ok" if ready else "starting",
        "encoder_version": runtime.encoder.version if runtime.encoder else None,
        "collection": runtime.store.name if runtime.store else None,
        "rows": await runtime.run(runtime.store.count) if ready else None,
        "retrieval": _retrieval() if ready else None,
    }
    return web.json(body, status=200 if ready else 503)


def _retrieval() -> dict:
    """The retriever serving queries and, for hybrid retrieval, the collection's fusion weight and self-check."""
    retriever = runtime.serving.query.retriever
    tuner = getattr(retriever, "tuner", None)
    return {"retriever": type(retriever).__name__, **({"fusion": tuner.health()} if tuner is not None else {})}


@app.page("/metrics")
async def prometheus(web, request):
    return web.bytes(metrics.render(), content_type="text/plain; version=0.0.4")
