"""The stream processor: the path every agent's batch takes, decode -> dead-letter -> retry -> ack.

Delivery is at-least-once with idempotent effects. Agents take batches with
``noack_take`` and ack each record only after its effect is durable (the
answer produced and acknowledged by the broker, the vectors upserted) or after
it went to the dead-letter topic. A stopped or crashed worker hands its
unacked batch back to the group. No exception escapes an agent: Faust acks a
record whose agent raised, which would drop it silently.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable, Sequence, TypeVar

from hybridrag.agents.app import app, dead_letter_topics, settings
from hybridrag.agents.kafka import metrics
from hybridrag.agents.kafka.schemas import MessageError, dead_letter, decode, encode

log = logging.getLogger("hybridrag")
T = TypeVar("T")


def is_transient(exc: BaseException) -> bool:
    """Errors of the infrastructure (worth waiting out), as opposed to errors of a record."""
    from pymilvus.exceptions import MilvusException

    from hybridrag.agents.rag.generator import GeneratorError

    if isinstance(exc, GeneratorError):
        return exc.transient
    if isinstance(exc, MilvusException):
        return True
    try:
        import redis

        if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
            return True
    except ImportError:  # pragma: no cover
        pass
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return False  # a missing checkpoint does not come back by waiting
    return isinstance(exc, (ConnectionError, TimeoutError, OSError))


async def send_dead_letter(event, reason: str, error_type: str) -> None:
    """Publish the record to its topic's dead-letter topic, with the reason and where it came from."""
    msg = event.message
    record = dead_letter(
        msg.value, reason=reason, error_type=error_type, topic=msg.topic, partition=msg.partition,
        offset=msg.offset, key=msg.key, worker=app.conf.id,
    )
    fut = await dead_letter_topics[msg.topic].send(key=msg.key, value=encode(record))
    await fut
    metrics.DEAD_LETTERS.labels(msg.topic, error_type).inc()
    log.warning("dead-lettered %s[%d]@%d: %s", msg.topic, msg.partition, msg.offset, reason,
                extra={"topic": msg.topic, "partition": msg.partition, "offset": msg.offset,
                       "key": msg.key.decode("utf-8", "replace") if msg.key else None})


def decode_events(events: Sequence, model, max_text_chars: int | None) -> tuple[list, list]:
    """Split ``events`` into ``(event, record)`` pairs that decode and ``(event, reason)`` pairs that do not."""
    good, bad = [], []
    for ev in events:
        try:
            good.append((ev, decode(model, ev.message.value, max_bytes=settings.max_message_bytes,
                                    max_text_chars=max_text_chars)))
        except MessageError as e:
            bad.append((ev, e.reason))
    return good, bad


def decode_valid(events: Sequence, model, max_text_chars: int | None) -> list:
    """The records of ``events`` that decode; the agent that owns the topic dead-letters the others."""
    return [record for _, record in decode_events(events, model, max_text_chars)[0]]


async def with_retries(agent: str, fn: Callable[[], Awaitable[T]]) -> T:
    """Retry ``fn`` with exponential backoff.

    A transient error (store or broker unreachable, endpoint overloaded) is
    retried until it passes: the batch stays unacked, so an outage delays
    records but never drops or dead-letters them. Any other error is
    retried ``retry_attempts`` times, then propagates to be isolated and
    dead-lettered.
    """
    delay = settings.retry_backoff_s
    attempt = 0
    while True:
        attempt += 1
        try:
            return await fn()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            transient = is_transient(exc)
            if not transient and attempt >= settings.retry_attempts:
                raise
            metrics.RETRIES.labels(agent).inc()
            log.warning("%s: attempt %d failed (%s: %s), %s in %.2fs", agent, attempt, type(exc).__name__, exc,
                        "transient, retrying" if transient else "retrying", delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, settings.retry_backoff_max_s)


async def handle_isolating_poison(agent: str, good: list, handle: Callable[[list], Awaitable[None]]) -> None:
    """Run ``handle`` on the batch; if it still fails, one record at a time, dead-lettering those that fail."""
    try:
        await with_retries(agent, lambda: handle(good))
    except asyncio.CancelledError:
        raise  # stopping: the unacked batch goes back to the group
    except Exception as exc:
        if len(good) == 1:
            await send_dead_letter(good[0][0], f"{type(exc).__name__}: {exc}", "processing")
            return
        # isolate the poison: one bad record must not dead-letter its batch
        log.warning("%s: batch of %d failed, retrying one by one", agent, len(good))
        for item in good:
            try:
                await with_retries(agent, lambda item=item: handle([item]))
            except asyncio.CancelledError:
                raise
            except Exception as one_exc:
                await send_dead_letter(item[0], f"{type(one_exc).__name__}: {one_exc}", "processing")


Handle = Callable[[list], Awaitable[Awaitable[None] | None]]


class InOrderTails:
    """The ends of batches (produce acknowledged, then ack), run in order beside the next batch's compute.

    At most one tail is in flight: :meth:`submit` first waits for the one before,
    so acks keep their order and a slow broker holds the next batch back instead
    of letting unfinished batches pile up. A stopping agent cancels the tail in
    flight; its batch stays unacked and goes back to the group.
    """

    def __init__(self):
        self._last: asyncio.Future | None = None

    async def submit(self, tail: Awaitable[None]) -> None:
        await self.drain()
        self._last = asyncio.ensure_future(tail)

    async def drain(self) -> None:
        last, self._last = self._last, None
        if last is not None:
            await last

    def cancel(self) -> None:
        if self._last is not None:
            self._last.cancel()


async def complete(handle: Handle, items: list) -> None:
    """Run ``handle`` and the rest of the effect it returns, if any."""
    rest = await handle(items)
    if rest is not None:
        await rest


async def process(agent: str, stream, events: Sequence, handle: Handle, model, max_chars: int | None,
                  tails: InOrderTails | None = None) -> None:
    """Decode, dead-letter the bad records, run ``handle`` on the good ones, then ack all.

    ``handle`` may return an awaitable, the rest of its effect (the answers' produce
    acknowledged, say): the records are acked only after it. With ``tails`` that rest
    and the acks run beside the next batch; without, before this call returns. A rest
    that fails runs its records again, whole, through the retries and the dead letters.
    """
    metrics.BATCH_SIZE.labels(agent).observe(len(events))
    good, bad = decode_events(events, model, max_chars)
    for ev, reason in bad:
        await send_dead_letter(ev, reason, "validation")
    started: list[tuple[list, Awaitable[None]]] = []  # (records, the rest of their effect)

    async def start(items: list) -> None:
        rest = await handle(items)
        if rest is not None:
            started.append((items, rest))

    if good:
        await handle_isolating_poison(agent, good, start)

    async def finish() -> None:
        for items, rest in started:
            try:
                await rest
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("%s: finishing a batch of %d failed (%s: %s), running it again", agent, len(items),
                            type(exc).__name__, exc)
                await handle_isolating_poison(agent, items, lambda its: complete(handle, its))
        await ack_all(stream, events)
        metrics.PROCESSED.labels(agent).inc(len(events))

    if tails is None:
        await finish()
    else:
        await tails.submit(finish())


async def ack_all(stream, events: Sequence) -> None:
    for ev in events:
        await stream.ack(ev)
