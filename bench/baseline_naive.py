"""What a careful user writes without hybridrag: one record at a time.

An aiokafka consumer takes one query, encodes it with sentence-transformers
all-MiniLM-L6-v2, searches Milvus Lite for the top 5, builds the same
extractive answer and produces it, then takes the next. Ingest is the same
loop over documents. Same corpus, broker and message schemas as hybridrag, so
bench/pipeline.py can drive both with one client.

    python bench/baseline_naive.py --bootstrap 127.0.0.1:9092 --prefix base- --milvus data/base.db
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from pymilvus import DataType, MilvusClient
from sentence_transformers import SentenceTransformer

from hybridrag.models.tokenizer import minilm_model_dir
from hybridrag.agents.rag.generator import ExtractiveGenerator
from hybridrag.agents.rag.store import Hit


def open_collection(uri: str) -> MilvusClient:
    client = MilvusClient(uri)
    if not client.has_collection("naive"):
        schema = MilvusClient.create_schema(auto_id=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=300)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=384)
        schema.add_field("doc_id", DataType.VARCHAR, max_length=256)
        schema.add_field("text", DataType.VARCHAR, max_length=65535)
        index = client.prepare_index_params()
        index.add_index("vector", index_type="FLAT", metric_type="IP")
        client.create_collection("naive", schema=schema, index_params=index)
    else:
        client.load_collection("naive")
    return client


async def main(args) -> None:
    model = SentenceTransformer(str(minilm_model_dir()), device="cpu")
    store = open_collection(args.milvus)
    generator = ExtractiveGenerator(3)
    producer = AIOKafkaProducer(bootstrap_servers=args.bootstrap, acks="all")
    consumer = AIOKafkaConsumer(
        f"{args.prefix}queries", f"{args.prefix}documents", bootstrap_servers=args.bootstrap,
        group_id=f"{args.prefix}naive", auto_offset_reset="earliest", enable_auto_commit=True,
        max_poll_records=1, fetch_max_wait_ms=20, session_timeout_ms=6000, heartbeat_interval_ms=1000,
    )
    await producer.start()
    await consumer.start()
    print("baseline ready", flush=True)
    try:
        async for msg in consumer:
            try:
                obj = orjson.loads(msg.value)
            except orjson.JSONDecodeError:
                continue
            if msg.topic.endswith("documents"):
                vec = model.encode([obj["text"]], normalize_embeddings=True)[0]
                store.upsert("naive", [{"id": obj["doc_id"], "vector": vec.tolist(), "doc_id": obj["doc_id"],
                                        "text": obj["text"][:60000]}])
                continue
            t0 = time.perf_counter()
            vec = model.encode([obj["text"]], normalize_embeddings=True)[0]
            t1 = time.perf_counter()
            res = store.search("naive", [vec.tolist()], limit=5, output_fields=["doc_id", "text"])[0]
            t2 = time.perf_counter()
            hits = [Hit(id=h["id"], doc_id=h["entity"]["doc_id"], chunk=0, text=h["entity"]["text"], score=h["distance"])
                    for h in res]
            text = generator.generate([obj["text"]], [hits])[0].text
            t3 = time.perf_counter()
            answer = {
                "schema_version": 1, "query_id": obj["query_id"], "answer": text,
                "sources": [{"schema_version": 1, "doc_id": h.doc_id, "chunk": 0, "chunk_id": h.id, "score": h.score,
                             "title": "", "text": h.text} for h in hits],
                "confident": bool(hits), "encoder_version": "minilm-l6-v2 (naive)", "generator": "extractive",
                "timings_ms": {"encode": (t1 - t0) * 1e3, "search": (t2 - t1) * 1e3, "fine": 0.0,
                               "generate": (t3 - t2) * 1e3, "buffer_wait": 0.0, "compute": (t3 - t0) * 1e3},
                "batch_size": 1, "worker": "naive", "answered_at": time.time(),
            }
            await producer.send_and_wait(f"{args.prefix}answers", orjson.dumps(answer), key=msg.key)
    finally:
        await consumer.stop()
        await producer.stop()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--prefix", default="")
    p.add_argument("--milvus", default="data/baseline-milvus.db")
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    asyncio.run(main(a))
