"""The memory manager: what the system keeps, scored by use, held in Redis.

Every indexed document has a record with its size and how it has been used:
how often it was retrieved (accesses), how often it was cited in an answer
(hits), when it was last touched (recency), and, for a synthetic document, the
quality its generator scored. Those make one **importance** with exponential
decay (a half-life in the config):

    I(t) = q * (w_access * A(t) + w_hit * H(t) + w_recency * R(t))

where A and H are decayed counters (each event adds 1, then halves every
half-life), R is 1 at the last touch and halves every half-life, and q is the
generation quality (1 for real documents). Because every term decays at the
same rate, I(t) = I(t0) * 2^-((t - t0)/half_life), so the order of two
documents never changes without an event. The sorted set therefore stores the
time-invariant key ``log2 I(t0) + t0/half_life`` and is only written when a
document is touched; no background job rescans it.

**Patterns** are query-term clusters: a query's content words, lower-cased,
stop words and plural ``s`` removed, sorted and de-duplicated
(:func:`query_signature`). "What is virtual memory?" and "virtual memories"
share one pattern. A pattern keeps its latest wording, a decayed count and the
documents its answers cited, so the continual learner can replay important
(query, passage) pairs (:meth:`MemoryManager.top_patterns`) as well as
important passages (:meth:`MemoryManager.top_important`).

Redis layout, under ``<prefix>:mem:`` (one prefix per deployment):

    doc:<doc_id>          hash: chunks, bytes, tenant, synthetic, quality, title, sample,
                          created, last_access, accesses, hits, a, h, r, t_ref
    z:lru                 sorted set, score = last touch (unix seconds)
    z:lfu                 sorted set, score = accesses + last_touch / 1e10 (ties go to the older)
    z:imp                 sorted set, score = log2 importance + t / half_life
    totals                hash: docs, bytes, queries, queries_hit, accesses, cited,
                          unknown_hits, evicted:<policy>, evicted_bytes
    offsets               hash "<group>/<topic>/<partition>" -> highest offset whose hits were counted
    pat:<sig>, pat:<sig>:docs, z:pat   patterns, their cited documents, their importance
    evicting              hash doc_id -> JSON intent (chunk ids, policy): eviction's write-ahead log
    evict-lock            one evictor at a time across workers

Every update is one Lua script, so a record, its sorted sets and the totals
change together; batches are pipelined. Scripts receive ``now`` from the
caller, which keeps them deterministic and lets tests drive the clock.

**Eviction** under a capacity (documents and/or bytes) removes the lowest
documents of the configured policy (``lru``, ``lfu`` or ``importance``). It
writes an intent for each victim first, deletes the vectors from the store,
then removes the record and the intent in one script. :meth:`recover` redoes
any intent left by a crash; both steps are idempotent, so a restart at any
point loses nothing and leaves nothing dangling.

**Degraded mode**: if Redis cannot be reached, every call raises
:class:`MemoryUnavailable`. The query path catches it and keeps answering.
Writes (ingest, hits, quality) are also kept in a bounded in-process buffer and
replayed, in order, before the next call that reaches Redis; replay is safe
because each of them is idempotent.

**Replays count once.** A query's hits come with the Kafka position of its
record (:class:`RecordPosition`); the hits script counts them only if the
offset is above the highest one already counted for that consumer group and
partition, and raises that mark in the same script (:func:`count_offset` is
the rule in Python). See :meth:`MemoryManager.record_hits` for why this is
exact.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Protocol, Sequence

import redis

from hybridrag.agents.rag.chunking import chunk_id

log = logging.getLogger(__name__)

Policy = Literal["lru", "lfu", "importance"]
POLICIES: tuple[str, ...] = ("lru", "lfu", "importance")
LFU_TIME_SCALE = 1e10  # unix seconds / 1e10 < 1 until the year 2286: recency only breaks LFU ties


class MemoryUnavailable(RuntimeError):
    """Redis could not be reached. ``buffered`` says whether the update was kept for replay.

    The query path catches this and keeps answering; the memory is advisory.
    """

    def __init__(self, message: str, buffered: bool = False):
        super().__init__(message)
        self.buffered = buffered


@dataclass(frozen=True)
class MemoryConfig:
    redis_url: str = "redis://127.0.0.1:6379/0"  # redis://user:pass@host/0 for AUTH, rediss:// for TLS
    prefix: str = "hybridrag"  # one key prefix per deployment
    policy: str = "importance"  # lru | lfu | importance
    capacity_docs: int = 0  # most documents kept; 0 = no limit
    capacity_bytes: int = 0  # most chunk-text bytes kept; 0 = no limit
    half_life_s: float = 7 * 86_400.0  # decay of counters and recency
    weight_access: float = 1.0  # per (decayed) retrieval
    weight_hit: float = 2.0  # per (decayed) citation in an answer: stronger evidence than retrieval
    weight_recency: float = 1.0  # a document touched now is worth this much before any use
    sample_bytes: int = 1_024  # text kept per document for replay by the continual learner
    pattern_docs: int = 8  # cited documents kept per pattern
    max_patterns: int = 50_000  # patterns kept: the least important one goes when a new one would exceed this
    buffer_max: int = 10_000  # updates buffered while Redis is down
    socket_timeout_s: float = 2.0  # Redis calls fail fast so the query path never waits long

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"{self.policy} is not a valid eviction policy ({', '.join(POLICIES)})")
        if self.half_life_s <= 0:
            raise ValueError("half_life_s must be positive")

    @classmethod
    def from_settings(cls, s: Any) -> "MemoryConfig":
        """Read ``redis_url``, ``redis_prefix`` and the ``memory_*`` fields of the typed settings."""
        d = cls()
        return cls(
            redis_url=getattr(s, "redis_url", d.redis_url),
            prefix=getattr(s, "redis_prefix", d.prefix),
            policy=getattr(s, "memory_policy", d.policy),
            capacity_docs=getattr(s, "memory_capacity_docs", d.capacity_docs),
            capacity_bytes=getattr(s, "memory_capacity_bytes", d.capacity_bytes),
            half_life_s=getattr(s, "memory_half_life_s", d.half_life_s),
            max_patterns=getattr(s, "memory_max_patterns", d.max_patterns),
        )


# ------------------------------------------------------------------ scoring (pure)


@dataclass
class UsageState:
    """A document's decayed usage at reference time ``t_ref``."""

    a: float = 0.0  # decayed accesses
    h: float = 0.0  # decayed citations
    r: float = 0.0  # recency: 1 at the last touch
    t_ref: float = 0.0


def decay_factor(dt: float, half_life: float) -> float:
    """2^(-dt / half_life); a clock that went backwards decays nothing."""
    return 1.0 if dt <= 0 else 2.0 ** (-dt / half_life)


def apply_event(
    s: UsageState, now: float, half_life: float, *, accesses: float = 0.0, hits: float = 0.0, touch: bool = False
) -> UsageState:
    """Decay ``s`` to ``now``, then add the event's accesses and hits; a touch resets recency to 1."""
    d = decay_factor(now - s.t_ref, half_life)
    return UsageState(
        a=s.a * d + accesses,
        h=s.h * d + hits,
        r=1.0 if touch else s.r * d,
        t_ref=max(s.t_ref, now),
    )


def importance(s: UsageState, quality: float, w_access: float, w_hit: float, w_recency: float) -> float:
    """Importance at ``s.t_ref``: quality times the weighted usage."""
    return quality * (w_access * s.a + w_hit * s.h + w_recency * s.r)


def importance_key(value: float, t: float, half_life: float) -> float:
    """The time-invariant sort key of an importance ``value`` observed at ``t``."""
    return math.log2(max(value, 1e-300)) + t / half_life


def importance_at(key: float, now: float, half_life: float) -> float:
    """Invert :func:`importance_key`: the decayed importance at ``now``."""
    return 2.0 ** (key - now / half_life)


def lfu_score(accesses: int, last_touch: float) -> float:
    """Access count, ties broken by the older last touch (it sorts first, so it goes first)."""
    return accesses + last_touch / LFU_TIME_SCALE


_STOP = frozenset(
    "a an and are as at be by can could did do does for from had has have how i in is it its me my of on or "
    "our should so that the their them there these this those to was we were what when where which who whom "
    "why will with would you your about into than then also any some they he she him her his its us".split()
)
_WORD = re.compile(r"[a-z0-9]+")


def query_signature(text: str, max_terms: int = 8) -> str:
    """A query's pattern: its sorted content terms ("memory virtual"), '' if it has none."""
    terms = set()
    for w in _WORD.findall(text.lower()):
        if w in _STOP or len(w) < 2:
            continue
        if len(w) > 3 and w.endswith("ies"):
            w = w[:-3] + "y"
        elif len(w) > 4 and w.endswith(("sses", "ches", "shes", "xes")):
            w = w[:-2]
        elif len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
            w = w[:-1]
        terms.add(w)
    return " ".join(sorted(terms)[:max_terms])


@dataclass(frozen=True)
class RecordPosition:
    """Where a query's record sits in Kafka: its consumer group, topic, partition and offset."""

    group: str
    topic: str
    partition: int
    offset: int

    @property
    def mark(self) -> str:
        """The field of the ``offsets`` hash that holds this partition's high-water mark."""
        return f"{self.group}/{self.topic}/{self.partition}"


def count_offset(mark: int | None, offset: int) -> tuple[bool, int | None]:
    """Whether a record at ``offset`` is counted under high-water ``mark`` (None: nothing counted yet), and the new mark.

    The hits script applies this rule in Lua; tests/integration/test_memory.py checks the two agree.
    """
    if mark is not None and offset <= mark:
        return False, mark
    return True, offset


# ------------------------------------------------------------------ records


class _RowLike(Protocol):
    id: str
    doc_id: str
    chunk: int
    text: str


@dataclass(frozen=True)
class DocRecord:
    """What the memory keeps about one indexed document."""

    doc_id: str
    chunks: int  # chunk ids are f"{doc_id}#{i}" for i < chunks
    bytes: int  # UTF-8 bytes of its chunk texts
    tenant: str = ""
    synthetic: bool = False
    quality: float | None = None  # generation quality of a synthetic document, in [0, 1]
    title: str = ""
    sample: str = ""  # opening text, for replay

    @classmethod
    def from_rows(cls, rows: Iterable[Any], quality: dict[str, float] | None = None) -> list["DocRecord"]:
        """One record per document from the store rows an ingest just upserted."""
        by_doc: dict[str, list] = {}
        for r in rows:
            by_doc.setdefault(r.doc_id, []).append(r)
        out = []
        for doc_id, rs in by_doc.items():
            rs.sort(key=lambda r: r.chunk)
            first = rs[0]
            out.append(
                cls(
                    doc_id=doc_id,
                    chunks=max(r.chunk for r in rs) + 1,
                    bytes=sum(len(r.text.encode("utf-8")) for r in rs),
                    tenant=getattr(first, "tenant", ""),
                    synthetic=bool(getattr(first, "synthetic", False)),
                    quality=(quality or {}).get(doc_id),
                    title=getattr(first, "title", ""),
                    sample=first.text,
                )
            )
        return out

    def chunk_ids(self) -> list[str]:
        return [chunk_id(self.doc_id, i) for i in range(self.chunks)]


@dataclass
class ImportantDoc:
    doc_id: str
    importance: float  # decayed to the time of the call
    accesses: int
    hits: int
    last_access: float
    quality: float
    synthetic: bool
    tenant: str
    title: str
    sample: str


@dataclass
class Pattern:
    signature: str
    query: str  # latest wording
    importance: float
    count: int
    doc_ids: list[str] = field(default_factory=list)  # most cited first, evicted ones left out


class _Store(Protocol):
    def delete(self, ids: list[str]) -> int: ...


# ------------------------------------------------------------------ Lua

# Shared by the scripts: decay, the importance key, and writing a document's
# state and sorted-set scores. Mirrors apply_event / importance / *_key above;
# tests/integration/test_memory.py checks the two agree.
_LUA_PRELUDE = r"""
local function fmt(x) return string.format('%.17g', x) end
local function decay(dt, H) if dt <= 0 then return 1 end return 2 ^ (-dt / H) end
local function imp_key(I, t, H)
  if I < 1e-300 then I = 1e-300 end
  return math.log(I) / math.log(2) + t / H
end
local function num(x, d) local v = tonumber(x) if v == nil then return d end return v end
-- decay the document to now, add accesses/hits, optionally touch; rewrite scores
local function touch_doc(doc, member, zlru, zlfu, zimp, now, H, wa, wh, wr, d_acc, d_hit, touch)
  local v = redis.call('HMGET', doc, 'a', 'h', 'r', 't_ref', 'accesses', 'hits', 'quality', 'last_access')
  local tref = num(v[4], now)
  local d = decay(now - tref, H)
  local a = num(v[1], 0) * d + d_acc
  local h = num(v[2], 0) * d + d_hit
  local r = num(v[3], 0) * d
  local last = num(v[8], now)
  if touch then r = 1; last = math.max(last, now) end
  if now > tref then tref = now end
  local acc = num(v[5], 0) + d_acc
  local hits = num(v[6], 0) + d_hit
  local q = num(v[7], 1)
  local I = q * (wa * a + wh * h + wr * r)
  redis.call('HSET', doc, 'a', fmt(a), 'h', fmt(h), 'r', fmt(r), 't_ref', fmt(tref),
             'accesses', acc, 'hits', hits, 'last_access', fmt(last))
  redis.call('ZADD', zlru, fmt(last), member)
  redis.call('ZADD', zlfu, fmt(acc + last / 1e10), member)
  redis.call('ZADD', zimp, fmt(imp_key(I, tref, H)), member)
end
"""

# KEYS: doc, zlru, zlfu, zimp, totals
# ARGV: doc_id, now, H, wa, wh, wr, chunks, bytes, tenant, synthetic, quality|'', title, sample
_LUA_INGEST = _LUA_PRELUDE + r"""
local doc, totals = KEYS[1], KEYS[5]
local now, H = tonumber(ARGV[2]), tonumber(ARGV[3])
local new_bytes = tonumber(ARGV[8])
if redis.call('EXISTS', doc) == 1 then
  local old = num(redis.call('HGET', doc, 'bytes'), 0)
  redis.call('HINCRBY', totals, 'bytes', new_bytes - old)
else
  redis.call('HINCRBY', totals, 'docs', 1)
  redis.call('HINCRBY', totals, 'bytes', new_bytes)
  redis.call('HSET', doc, 'created', fmt(now), 'quality', '1')
end
redis.call('HSET', doc, 'chunks', ARGV[7], 'bytes', ARGV[8], 'tenant', ARGV[9], 'synthetic', ARGV[10],
           'title', ARGV[12], 'sample', ARGV[13])
if ARGV[11] ~= '' then redis.call('HSET', doc, 'quality', ARGV[11]) end
touch_doc(doc, ARGV[1], KEYS[2], KEYS[3], KEYS[4], now, H, tonumber(ARGV[4]), tonumber(ARGV[5]),
          tonumber(ARGV[6]), 0, 0, true)
return 1
"""

# KEYS: offsets, totals, zlru, zlfu, zimp, pat, patdocs, zpat
# ARGV: now, H, wa, wh, wr, mark ('' = no position: count), offset, key namespace, signature, query,
#       pattern_docs, max_patterns, n, then n x (doc_id, cited)
_LUA_HITS = _LUA_PRELUDE + r"""
local offsets, totals, zlru, zlfu, zimp = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local now, H = tonumber(ARGV[1]), tonumber(ARGV[2])
local wa, wh, wr = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local ns = ARGV[8]
if ARGV[6] ~= '' then
  -- count_offset: a record at or below the partition's mark was counted before
  local offset = tonumber(ARGV[7])
  local mark = tonumber(redis.call('HGET', offsets, ARGV[6]))
  if mark ~= nil and offset <= mark then return 0 end
  redis.call('HSET', offsets, ARGV[6], ARGV[7])
end
local n = tonumber(ARGV[13])
redis.call('HINCRBY', totals, 'queries', 1)
if n > 0 then redis.call('HINCRBY', totals, 'queries_hit', 1) end
local cited_docs = {}
for i = 0, n - 1 do
  local doc_id, cited = ARGV[14 + 2 * i], tonumber(ARGV[15 + 2 * i])
  local doc = ns .. 'doc:' .. doc_id
  if redis.call('EXISTS', doc) == 1 then
    touch_doc(doc, doc_id, zlru, zlfu, zimp, now, H, wa, wh, wr, 1, cited, true)
    redis.call('HINCRBY', totals, 'accesses', 1)
    if cited > 0 then
      redis.call('HINCRBY', totals, 'cited', 1)
      table.insert(cited_docs, doc_id)
    end
  else
    redis.call('HINCRBY', totals, 'unknown_hits', 1)
  end
end
if ARGV[9] ~= '' then
  local pat, patdocs, zpat = KEYS[6], KEYS[7], KEYS[8]
  local v = redis.call('HMGET', pat, 'a', 't_ref')
  local tref = num(v[2], now)
  local a = num(v[1], 0) * decay(now - tref, H) + 1
  if now > tref then tref = now end
  redis.call('HSET', pat, 'a', fmt(a), 't_ref', fmt(tref), 'query', ARGV[10], 'last_seen', fmt(now))
  redis.call('HINCRBY', pat, 'count', 1)
  for _, d in ipairs(cited_docs) do redis.call('ZINCRBY', patdocs, 1, d) end
  local keep = tonumber(ARGV[11])
  redis.call('ZREMRANGEBYRANK', patdocs, 0, -(keep + 1))
  -- a pattern's importance: decayed query count plus recency, same half-life as documents
  redis.call('ZADD', zpat, fmt(imp_key(wa * a + wr, tref, H)), ARGV[9])
  -- at most max_patterns: the least important go, with their keys
  local extra = redis.call('ZCARD', zpat) - tonumber(ARGV[12])
  if extra > 0 then
    for _, sig in ipairs(redis.call('ZRANGE', zpat, 0, extra - 1)) do
      redis.call('DEL', ns .. 'pat:' .. sig, ns .. 'pat:' .. sig .. ':docs')
    end
    redis.call('ZREMRANGEBYRANK', zpat, 0, extra - 1)
  end
end
return 1
"""

# KEYS: doc, zlru, zlfu, zimp     ARGV: doc_id, now, H, wa, wh, wr, quality
_LUA_QUALITY = _LUA_PRELUDE + r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'quality', ARGV[7])
touch_doc(KEYS[1], ARGV[1], KEYS[2], KEYS[3], KEYS[4], tonumber(ARGV[2]), tonumber(ARGV[3]),
          tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), 0, 0, false)
return 1
"""

# Remove the record of an evicted document, but only while its intent stands:
# a replay after the first run finds no intent and changes nothing.
# KEYS: intents, doc, zlru, zlfu, zimp, totals      ARGV: doc_id
_LUA_FINISH_EVICTION = r"""
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local intent = cjson.decode(raw)
if redis.call('EXISTS', KEYS[2]) == 1 then
  local b = tonumber(redis.call('HGET', KEYS[2], 'bytes')) or 0
  redis.call('DEL', KEYS[2])
  redis.call('HINCRBY', KEYS[6], 'docs', -1)
  redis.call('HINCRBY', KEYS[6], 'bytes', -b)
  redis.call('HINCRBY', KEYS[6], 'evicted_bytes', b)
  redis.call('HINCRBY', KEYS[6], 'evicted:' .. intent['policy'], 1)
end
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
"""

_LUA_UNLOCK = r"""
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, OSError)


# ------------------------------------------------------------------ the manager


class MemoryManager:
    """Importance, usage and eviction of indexed documents, kept in Redis.

    Thread-safe: the redis client pools connections; the replay buffer has a lock.
    """

    def __init__(self, config: MemoryConfig | None = None, client: redis.Redis | None = None):
        self.config = config or MemoryConfig()
        c = self.config
        self.client = client or redis.Redis.from_url(
            c.redis_url,
            socket_timeout=c.socket_timeout_s,
            socket_connect_timeout=c.socket_timeout_s,
            health_check_interval=30,
        )
        self.ns = f"{c.prefix}:mem:"
        self._ingest = self.client.register_script(_LUA_INGEST)
        self._hits = self.client.register_script(_LUA_HITS)
        self._quality = self.client.register_script(_LUA_QUALITY)
        self._finish = self.client.register_script(_LUA_FINISH_EVICTION)
        self._unlock = self.client.register_script(_LUA_UNLOCK)
        self._pending: deque[Callable[[], Any]] = deque()
        self._pending_lock = threading.Lock()
        self.dropped_updates = 0  # buffered updates lost to a full buffer

    # -------------------------------------------------------------- keys

    def _k(self, name: str) -> str:
        return self.ns + name

    def _doc(self, doc_id: str) -> str:
        return self.ns + "doc:" + doc_id

    def _zset(self, policy: str) -> str:
        return self._k({"lru": "z:lru", "lfu": "z:lfu", "importance": "z:imp"}[policy])

    @property
    def _weights(self) -> tuple[float, float, float, float]:
        c = self.config
        return c.half_life_s, c.weight_access, c.weight_hit, c.weight_recency

    # -------------------------------------------------------------- degraded mode

    def _call(self, fn: Callable[[], Any], *, buffer: bool = False) -> Any:
        """Run ``fn`` against Redis after any buffered updates; map an outage to MemoryUnavailable."""
        try:
            self.flush_pending()
            return fn()
        except redis.AuthenticationError as exc:
            # a wrong password is configuration, not an outage: nothing to replay later
            raise MemoryUnavailable(f"redis authentication failed: {exc}") from exc
        except _REDIS_DOWN as exc:
            if buffer:
                with self._pending_lock:
                    if len(self._pending) >= self.config.buffer_max:
                        self._pending.popleft()
                        self.dropped_updates += 1
                    self._pending.append(fn)
            raise MemoryUnavailable(f"redis unavailable: {exc}", buffered=buffer) from exc

    def flush_pending(self) -> int:
        """Replay updates buffered during an outage, oldest first. Returns how many were applied."""
        done = 0
        with self._pending_lock:
            while self._pending:
                try:
                    self._pending[0]()  # raises while Redis is still down; the update stays queued
                except _REDIS_DOWN:
                    raise
                except redis.RedisError:
                    # Redis answered but refused it: replaying again would block the queue forever
                    log.exception("memory: dropping a buffered update Redis rejected")
                    self.dropped_updates += 1
                self._pending.popleft()
                done += 1
        if done:
            log.info("memory: replayed %d buffered updates", done)
        return done

    @property
    def pending(self) -> int:
        return len(self._pending)

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except _REDIS_DOWN:
            return False

    # -------------------------------------------------------------- updates

    def record_ingest(self, docs: Sequence[DocRecord], now: float | None = None) -> int:
        """Create or refresh the records of indexed documents (one pipeline). Idempotent."""
        if not docs:
            return 0
        now = time.time() if now is None else now
        H, wa, wh, wr = self._weights
        sb = self.config.sample_bytes
        keys_common = [self._k("z:lru"), self._k("z:lfu"), self._k("z:imp"), self._k("totals")]
        args = [
            (
                [self._doc(d.doc_id), *keys_common],
                [
                    d.doc_id, repr(now), repr(H), repr(wa), repr(wh), repr(wr), d.chunks, d.bytes, d.tenant,
                    int(d.synthetic), "" if d.quality is None else repr(float(d.quality)), d.title[:1000],
                    d.sample.encode("utf-8")[:sb].decode("utf-8", "ignore"),
                ],
            )
            for d in docs
        ]

        def run() -> int:
            pipe = self.client.pipeline(transaction=False)
            for keys, a in args:
                self._ingest(keys=keys, args=a, client=pipe)
            pipe.execute()
            return len(args)

        return self._call(run, buffer=True)

    def record_hits(
        self,
        hits: Sequence[Any],
        *,
        position: RecordPosition | None = None,
        query: str = "",
        cited: Iterable[str] | None = None,
        now: float | None = None,
    ) -> bool:
        """Count one query's retrieval: each document in ``hits`` was accessed once.

        ``cited`` names the documents (doc ids or chunk ids) its answer cited;
        ``None`` means all of ``hits``. An empty ``hits`` counts a query with no
        confident context. ``position`` is the Kafka position of the query's
        record: a record at or below its partition's high-water mark is a
        replay and changes nothing; without a position the hits always count.
        Returns whether they were counted now.

        Why a high-water offset per (group, topic, partition) and not a marker
        per query: the state is O(partitions) whatever the traffic, and it
        changes in the same script as the counts, so the two cannot disagree.
        It is exact because Kafka orders the replays for us: a worker records
        one partition's hits in offset order (one memory lane, batches in
        order), and acks a record only after its hits are recorded, so a new
        owner after a rebalance starts at or below the first offset nobody
        counted, and of two owners replaying the same offsets, whichever
        reaches one first counts it and the other skips it. A time window
        instead would grow with the query rate and count twice any replay
        older than itself. Not exact: hits buffered during a Redis outage by a
        worker that then lost the partition, replayed after the new owner
        counted later offsets of it; those are skipped (counted less, never twice).
        """
        keys, args = self._hits_args(hits, position, query, cited, now)
        return bool(self._call(lambda: self._hits(keys=keys, args=args), buffer=True))

    def record_hits_many(self, queries: Sequence[tuple[Sequence[Any], RecordPosition | None, str]],
                         now: float | None = None) -> list[bool]:
        """:meth:`record_hits` for a batch of ``(hits, position, query)``, in order, in one round trip.

        Each query is still its own script, so each is counted or skipped on
        its own; while Redis is down the batch is buffered as one update.
        """
        if not queries:
            return []
        calls = [self._hits_args(hits, position, query, None, now) for hits, position, query in queries]

        def run() -> list[bool]:
            pipe = self.client.pipeline(transaction=False)
            for keys, args in calls:
                self._hits(keys=keys, args=args, client=pipe)
            return [bool(r) for r in pipe.execute()]

        return self._call(run, buffer=True)

    def _hits_args(self, hits, position, query, cited, now) -> tuple[list, list]:
        now = time.time() if now is None else now
        H, wa, wh, wr = self._weights
        docs: dict[str, int] = {}
        for h in hits:
            docs.setdefault(h.doc_id, 0)
        if cited is None:
            cited_docs = set(docs)
        else:
            cited_docs = {c.split("#", 1)[0] for c in cited}
        for d in docs:
            docs[d] = int(d in cited_docs)
        sig = query_signature(query) if query else ""
        keys = [
            self._k("offsets"), self._k("totals"), self._k("z:lru"), self._k("z:lfu"), self._k("z:imp"),
            self._k(f"pat:{sig}"), self._k(f"pat:{sig}:docs"), self._k("z:pat"),
        ]
        args: list = [
            repr(now), repr(H), repr(wa), repr(wh), repr(wr),
            position.mark if position else "", position.offset if position else 0, self.ns, sig,
            query[:1000], self.config.pattern_docs, self.config.max_patterns, len(docs),
        ]
        for d, c in docs.items():
            args += [d, c]
        return keys, args

    def offset_marks(self) -> dict[str, int]:
        """The high-water offset counted per ``<group>/<topic>/<partition>``."""
        raw = self._call(lambda: self.client.hgetall(self._k("offsets")))
        return {k.decode(): int(v) for k, v in raw.items()}

    def record_synthetic_quality(self, doc_id: str, quality: float, now: float | None = None) -> bool:
        """Set the generation quality (in [0, 1]) of a synthetic document; False if it has no record."""
        if not 0.0 <= quality <= 1.0:
            raise ValueError(f"quality must be in [0, 1], got {quality}")
        now = time.time() if now is None else now
        H, wa, wh, wr = self._weights
        keys = [self._doc(doc_id), self._k("z:lru"), self._k("z:lfu"), self._k("z:imp")]
        args = [doc_id, repr(now), repr(H), repr(wa), repr(wh), repr(wr), repr(float(quality))]
        return bool(self._call(lambda: self._quality(keys=keys, args=args), buffer=True))

    # -------------------------------------------------------------- eviction

    def _over(self) -> tuple[int, int]:
        docs, nbytes = self.client.hmget(self._k("totals"), "docs", "bytes")
        docs, nbytes = int(docs or 0), int(nbytes or 0)
        c = self.config
        return (docs - c.capacity_docs if c.capacity_docs else 0), (nbytes - c.capacity_bytes if c.capacity_bytes else 0)

    def eviction_order(self, limit: int = 100) -> list[str]:
        """The next documents the configured policy would evict, first first."""
        return [m.decode() for m in self._call(lambda: self.client.zrange(self._zset(self.config.policy), 0, limit - 1))]

    def evict(self, store: _Store, lock_ttl_s: float = 300.0) -> list[str]:
        """Evict until the capacity holds; returns the evicted doc ids in eviction order.

        Finishes any earlier interrupted eviction first. Only one worker evicts
        at a time (a Redis lock); another caller returns [] at once.
        """
        return self._call(lambda: self._evict(store, lock_ttl_s))

    def _evict(self, store: _Store, lock_ttl_s: float) -> list[str]:
        lock, token = self._k("evict-lock"), uuid.uuid4().hex
        if not self.client.set(lock, token, nx=True, px=int(lock_ttl_s * 1000)):
            return []
        try:
            self._recover(store)
            over_docs, over_bytes = self._over()
            policy = self.config.policy
            victims: list[tuple[str, int, int]] = []  # doc id, chunks, bytes
            start = 0
            while over_docs > 0 or over_bytes > 0:
                page = [m.decode() for m in self.client.zrange(self._zset(policy), start, start + 99)]
                if not page:
                    break
                start += len(page)
                pipe = self.client.pipeline(transaction=False)
                for d in page:
                    pipe.hmget(self._doc(d), "chunks", "bytes")
                for d, (chunks, nbytes) in zip(page, pipe.execute()):
                    if over_docs <= 0 and over_bytes <= 0:
                        break
                    if chunks is None:  # a dangling set member; the finish script cleans it
                        victims.append((d, 0, 0))
                        continue
                    victims.append((d, int(chunks), int(nbytes or 0)))
                    over_docs -= 1
                    over_bytes -= int(nbytes or 0)
            if not victims:
                return []
            # write-ahead: the intents are durable before any vector goes
            intents = {
                d: json.dumps({"ids": [chunk_id(d, i) for i in range(n)], "policy": policy, "at": time.time()})
                for d, n, _ in victims
            }
            self.client.hset(self._k("evicting"), mapping=intents)
            self._apply_intents(store, {d: json.loads(v) for d, v in intents.items()})
            order = [d for d, _, _ in victims]
            log.info("memory: evicted %d documents by %s", len(order), policy)
            return order
        finally:
            self._unlock(keys=[lock], args=[token])

    def _apply_intents(self, store: _Store, intents: dict[str, dict]) -> None:
        ids = [i for intent in intents.values() for i in intent["ids"]]
        if ids:
            store.delete(ids)  # idempotent: deleting an absent id is a no-op
        keys_common = [self._k("z:lru"), self._k("z:lfu"), self._k("z:imp"), self._k("totals")]
        pipe = self.client.pipeline(transaction=False)
        for d in intents:
            self._finish(keys=[self._k("evicting"), self._doc(d), *keys_common], args=[d], client=pipe)
        pipe.execute()

    def pending_evictions(self) -> dict[str, dict]:
        raw = self._call(lambda: self.client.hgetall(self._k("evicting")))
        return {k.decode(): json.loads(v) for k, v in raw.items()}

    def recover(self, store: _Store) -> int:
        """Finish evictions a crash interrupted: delete their vectors, then their records. Run at start-up."""
        return self._call(lambda: self._recover(store))

    def _recover(self, store: _Store) -> int:
        raw = self.client.hgetall(self._k("evicting"))
        if not raw:
            return 0
        intents = {k.decode(): json.loads(v) for k, v in raw.items()}
        self._apply_intents(store, intents)
        log.warning("memory: finished %d interrupted evictions", len(intents))
        return len(intents)

    # -------------------------------------------------------------- reads

    def importance_of(self, doc_id: str, now: float | None = None) -> float | None:
        now = time.time() if now is None else now
        key = self._call(lambda: self.client.zscore(self._k("z:imp"), doc_id))
        return None if key is None else importance_at(key, now, self.config.half_life_s)

    def top_important(self, n: int, now: float | None = None) -> list[ImportantDoc]:
        """The ``n`` most important documents now, most important first, with a text sample for replay."""
        now = time.time() if now is None else now
        H = self.config.half_life_s

        def run() -> list[ImportantDoc]:
            top = self.client.zrevrange(self._k("z:imp"), 0, n - 1, withscores=True)
            pipe = self.client.pipeline(transaction=False)
            for m, _ in top:
                pipe.hgetall(self._doc(m.decode()))
            out = []
            for (m, key), h in zip(top, pipe.execute()):
                if not h:
                    continue
                g = {k.decode(): v.decode() for k, v in h.items()}
                out.append(
                    ImportantDoc(
                        doc_id=m.decode(), importance=importance_at(key, now, H), accesses=int(g.get("accesses", 0)),
                        hits=int(g.get("hits", 0)), last_access=float(g.get("last_access", 0)),
                        quality=float(g.get("quality", 1)), synthetic=g.get("synthetic") == "1",
                        tenant=g.get("tenant", ""), title=g.get("title", ""), sample=g.get("sample", ""),
                    )
                )
            return out

        return self._call(run)

    def most_recent(self, n: int, now: float | None = None) -> list[ImportantDoc]:
        """The ``n`` most recently touched documents, latest first, with a text sample.

        What the latest queries retrieved (or the latest ingest added): the
        continual learner's view of the current traffic's documents.
        """
        now = time.time() if now is None else now
        H = self.config.half_life_s

        def run() -> list[ImportantDoc]:
            ids = [m.decode() for m in self.client.zrevrange(self._k("z:lru"), 0, n - 1)]
            pipe = self.client.pipeline(transaction=False)
            for d in ids:
                pipe.hgetall(self._doc(d))
                pipe.zscore(self._k("z:imp"), d)
            res = pipe.execute()
            out = []
            for i, d in enumerate(ids):
                h, key = res[2 * i], res[2 * i + 1]
                if not h:
                    continue
                g = {k.decode(): v.decode() for k, v in h.items()}
                out.append(
                    ImportantDoc(
                        doc_id=d, importance=0.0 if key is None else importance_at(key, now, H),
                        accesses=int(g.get("accesses", 0)), hits=int(g.get("hits", 0)),
                        last_access=float(g.get("last_access", 0)), quality=float(g.get("quality", 1)),
                        synthetic=g.get("synthetic") == "1", tenant=g.get("tenant", ""), title=g.get("title", ""),
                        sample=g.get("sample", ""),
                    )
                )
            return out

        return self._call(run)

    def top_patterns(self, n: int, now: float | None = None) -> list[Pattern]:
        """The ``n`` most important query patterns with the documents their answers cited."""
        now = time.time() if now is None else now
        H = self.config.half_life_s

        def run() -> list[Pattern]:
            top = self.client.zrevrange(self._k("z:pat"), 0, n - 1, withscores=True)
            pipe = self.client.pipeline(transaction=False)
            for m, _ in top:
                s = m.decode()
                pipe.hmget(self._k(f"pat:{s}"), "query", "count")
                pipe.zrevrange(self._k(f"pat:{s}:docs"), 0, -1)
            res = pipe.execute()
            cand = [[d.decode() for d in res[2 * i + 1]] for i in range(len(top))]
            pipe = self.client.pipeline(transaction=False)
            for ds in cand:
                for d in ds:
                    pipe.exists(self._doc(d))
            alive = iter(pipe.execute())
            out = []
            for i, (m, key) in enumerate(top):
                q, count = res[2 * i]
                docs = [d for d in cand[i] if next(alive)]
                out.append(
                    Pattern(
                        signature=m.decode(), query=(q or b"").decode(), importance=importance_at(key, now, H),
                        count=int(count or 0), doc_ids=docs,
                    )
                )
            return out

        return self._call(run)

    def stats(self) -> dict:
        """Size, bytes, hit rate and evictions by policy, for ``hybridrag memory stats``."""
        def run() -> dict:
            pipe = self.client.pipeline(transaction=False)
            pipe.hgetall(self._k("totals"))
            pipe.hlen(self._k("evicting"))
            pipe.zcard(self._k("z:pat"))
            totals, pending, patterns = pipe.execute()
            t = {k.decode(): int(v) for k, v in totals.items()}
            queries = t.get("queries", 0)
            c = self.config
            return {
                "prefix": c.prefix,
                "policy": c.policy,
                "documents": t.get("docs", 0),
                "bytes": t.get("bytes", 0),
                "capacity_docs": c.capacity_docs,
                "capacity_bytes": c.capacity_bytes,
                "queries": queries,
                "queries_with_hits": t.get("queries_hit", 0),
                "hit_rate": t.get("queries_hit", 0) / queries if queries else 0.0,
                "accesses": t.get("accesses", 0),
                "cited": t.get("cited", 0),
                "cite_rate": t.get("cited", 0) / t["accesses"] if t.get("accesses") else 0.0,
                "unknown_hits": t.get("unknown_hits", 0),
                "evictions": {p: t.get(f"evicted:{p}", 0) for p in POLICIES},
                "evicted_bytes": t.get("evicted_bytes", 0),
                "pending_evictions": pending,
                "patterns": patterns,
                "buffered_updates": self.pending,
                "dropped_updates": self.dropped_updates,
            }

        return self._call(run)

    def clear(self) -> int:
        """Delete every key of this deployment's memory (tests, ``hybridrag memory clear``)."""
        def run() -> int:
            n = 0
            for batch in _chunks(self.client.scan_iter(match=self.ns + "*", count=500), 500):
                n += self.client.delete(*batch)
            return n

        return self._call(run)

    def close(self) -> None:
        self.client.close()


def _chunks(it: Iterable, n: int):
    buf = []
    for x in it:
        buf.append(x)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf
