"""Ask questions through Kafka and wait for their answers.

    async with AsyncClient(settings) as client:
        answer = await client.ask("What is a compiler?")

The client publishes a ``Query`` with a fresh ``query_id`` (the correlation id)
and reads ``answers`` from the end, keeping only answers to its own queries. It
also reads ``queries.dlq``: a query the worker rejects fails at once with
``QueryRejected`` and the worker's reason, instead of waiting out the timeout.
Delivery is at-least-once, so the same answer may arrive twice: the client
drops duplicates by ``query_id``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Iterable, Sequence

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from hybridrag.agents.kafka.schemas import Answer, DeadLetter, Document, MessageError, Query, decode, encode
from hybridrag.agents.settings import Settings


class AnswerTimeout(TimeoutError):
    """Some queries were not answered in time; ``missing`` holds their ids."""

    def __init__(self, missing: Sequence[str], timeout_s: float, bootstrap: str):
        self.missing = list(missing)
        shown = ", ".join(self.missing[:5]) + (" ..." if len(self.missing) > 5 else "")
        super().__init__(
            f"no answer within {timeout_s:.0f}s for {len(self.missing)} quer{'y' if len(self.missing) == 1 else 'ies'} "
            f"({shown}). Is a worker running against {bootstrap}? Start one with `hybridrag worker`."
        )


class QueryRejected(ValueError):
    """The worker dead-lettered a query; ``reason`` is what it said."""

    def __init__(self, query_id: str, reason: str, error_type: str):
        self.query_id, self.reason, self.error_type = query_id, reason, error_type
        super().__init__(f"the worker rejected query {query_id} ({error_type}): {reason}")


class AsyncClient:
    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings()
        if not self.settings.kafka_bootstrap_servers:
            raise ValueError("KAFKA_BOOTSTRAP_SERVERS is not set: the client needs a broker to talk to")
        topo = self.settings.topology
        self.queries_topic = topo["queries"].name
        self.answers_topic = topo["answers"].name
        self.rejected_topic = topo["queries"].dlq
        self.documents_topic = topo["documents"].name
        self.producer: AIOKafkaProducer | None = None
        self.consumer: AIOKafkaConsumer | None = None
        self._waiting: dict[str, asyncio.Future] = {}
        self._seen: set[str] = set()
        self.duplicates = 0  # answers received again after their first delivery
        self._reader: asyncio.Task | None = None

    async def __aenter__(self) -> "AsyncClient":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def start(self) -> None:
        kw = self.settings.kafka_client_kwargs()
        bootstrap = self.settings.kafka_bootstrap_servers
        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=2, **kw)
        await self.producer.start()

    async def _start_reader(self) -> None:
        if self.consumer is not None:
            return
        kw = self.settings.kafka_client_kwargs()
        # no group: every client sees every answer and keeps its own
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap_servers, enable_auto_commit=False,
            fetch_max_wait_ms=self.settings.kafka_fetch_max_wait_ms, **kw
        )
        await self.consumer.start()
        tps = []
        for topic in (self.answers_topic, self.rejected_topic):
            parts = self.consumer.partitions_for_topic(topic)
            if not parts:
                await self.consumer._client.force_metadata_update()
                parts = self.consumer.partitions_for_topic(topic) or {0}
            tps += [TopicPartition(topic, p) for p in sorted(parts)]
        self.consumer.assign(tps)
        await self.consumer.seek_to_end(*tps)
        for tp in tps:  # resolve the lazy seek now, before any query is sent
            await self.consumer.position(tp)
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.consumer is not None
        async for msg in self.consumer:
            if msg.topic == self.rejected_topic:
                self._rejected(msg)
                continue
            try:
                ans = decode(Answer, msg.value, max_bytes=16 * 1024 * 1024)
            except MessageError:
                continue  # not ours to judge: the answers topic is written by workers
            if ans.query_id in self._seen:
                self.duplicates += 1
                continue
            fut = self._waiting.pop(ans.query_id, None)
            if fut is not None and not fut.done():
                self._seen.add(ans.query_id)
                fut.set_result(ans)

    def _rejected(self, msg) -> None:
        """A dead letter of one of our queries fails its future with the worker's reason."""
        query_id = msg.key.decode("utf-8", "replace") if msg.key else ""
        fut = self._waiting.get(query_id)
        if fut is None or fut.done():
            return
        try:
            letter = DeadLetter.model_validate_json(msg.value)
        except ValueError:
            return
        self._waiting.pop(query_id, None)
        fut.set_exception(QueryRejected(query_id, letter.reason, letter.error_type))

    async def stop(self) -> None:
        if self._reader:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):
                pass
        if self.consumer:
            await self.consumer.stop()
        if self.producer:
            await self.producer.stop()

    async def submit(self, query: Query) -> asyncio.Future:
        """Publish one query; the future resolves to its answer."""
        await self._start_reader()
        assert self.producer is not None
        fut = asyncio.get_running_loop().create_future()
        self._waiting[query.query_id] = fut
        await self.producer.send(self.queries_topic, encode(query), key=query.query_id.encode())
        return fut

    async def ask_many(
        self, texts: Iterable[str], *, timeout_s: float = 60.0, tenant: str = "", top_k: int | None = None
    ) -> list[Answer]:
        queries = [Query(query_id=uuid.uuid4().hex, text=t, tenant=tenant, top_k=top_k, sent_at=time.time()) for t in texts]
        futures = [await self.submit(q) for q in queries]
        assert self.producer is not None
        await self.producer.flush()
        done, pending = await asyncio.wait(futures, timeout=timeout_s)
        for f in futures:  # a rejection is known at once; it is the more useful error
            if f.done() and isinstance(f.exception(), QueryRejected):
                for p in pending:
                    p.cancel()
                raise f.exception()
        if pending:
            missing = [q.query_id for q, f in zip(queries, futures) if f in pending]
            for q in missing:
                self._waiting.pop(q, None)
            raise AnswerTimeout(missing, timeout_s, self.settings.kafka_bootstrap_servers)
        return [f.result() for f in futures]

    async def ask(self, text: str, *, timeout_s: float = 60.0, tenant: str = "", top_k: int | None = None) -> Answer:
        return (await self.ask_many([text], timeout_s=timeout_s, tenant=tenant, top_k=top_k))[0]

    async def publish_documents(self, docs: Iterable[Document]) -> int:
        assert self.producer is not None
        n = 0
        batch = []
        for doc in docs:
            batch.append(await self.producer.send(self.documents_topic, encode(doc), key=doc.doc_id.encode()))
            n += 1
            if len(batch) >= 1000:
                await asyncio.gather(*batch)
                batch.clear()
        await asyncio.gather(*batch)
        return n

    async def publish_raw(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        """Publish bytes as they are (for tests and tools that need malformed records)."""
        assert self.producer is not None
        await (await self.producer.send(topic, value, key=key))


class Client:
    """The synchronous face of ``AsyncClient``, for scripts and the CLI."""

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings()

    def ask(self, text: str, timeout_s: float = 60.0, tenant: str = "", top_k: int | None = None) -> Answer:
        return self.ask_many([text], timeout_s=timeout_s, tenant=tenant, top_k=top_k)[0]

    def ask_many(self, texts: Sequence[str], timeout_s: float = 60.0, tenant: str = "", top_k: int | None = None) -> list[Answer]:
        async def go():
            async with AsyncClient(self.settings) as c:
                return await c.ask_many(texts, timeout_s=timeout_s, tenant=tenant, top_k=top_k)

        return asyncio.run(go())


def answer_to_json(ans: Answer) -> bytes:
    return orjson.dumps(ans.model_dump(mode="json"), option=orjson.OPT_INDENT_2)
