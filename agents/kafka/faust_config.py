"""How the Faust app talks to Kafka: the app's settings from ours, and a transport with a configurable fetch wait."""

from __future__ import annotations

import faust

from hybridrag.agents.settings import Settings


def _faust_broker_credentials(s: Settings):
    if s.kafka_security_protocol.startswith("SASL"):
        return faust.SASLCredentials(
            username=s.kafka_sasl_username,
            password=s.kafka_sasl_password.get_secret_value(),
            ssl_context=s.ssl_context(),
            mechanism=s.kafka_sasl_mechanism,
        )
    if s.kafka_security_protocol == "SSL":
        return faust.SSLCredentials(s.ssl_context())
    return None


def faust_settings(s: Settings) -> dict:
    """Keyword arguments for ``faust.App`` from our settings."""
    servers = s.kafka_bootstrap_servers or "127.0.0.1:9092"
    return dict(
        broker=[f"kafka://{h.strip()}" for h in servers.split(",") if h.strip()],
        broker_credentials=_faust_broker_credentials(s),
        value_serializer="raw",
        key_serializer="raw",
        # read from the beginning of a partition the group has never committed,
        # so records published before the worker joined are answered
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=s.kafka_session_timeout_s,
        broker_rebalance_timeout=s.kafka_rebalance_timeout_s,
        broker_heartbeat_interval=s.kafka_heartbeat_interval_s,
        broker_commit_interval=s.kafka_commit_interval_s,
        broker_max_poll_interval=s.kafka_max_poll_interval_s,
        producer_acks=-1,  # an answer counts as produced once all in-sync replicas have it
        topic_disable_leader=True,
        topic_allow_declare=False,  # topics come from topics.yaml via `hybridrag topics create`
        web_enabled=True,
        web_port=s.web_port,
        web_host=s.web_host,
        web_bind=s.web_host,
        # we do not use tables, so no changelog topics or RocksDB
        store="memory://",
        # Faust's default waits on stop and on every revocation until each
        # message a stream took is acked. A query goes to two agents (the answer
        # path and the synthesizer), and a message counts as acked only when
        # both have acked it; the queue flush at stop or revocation discards the
        # copy the other agent had not taken yet, so the wait never ends (seen as
        # workers that hang on SIGTERM and stall in a rebalance). Unacked records
        # are not committed either way: they are redelivered to the next owner,
        # and answers and upserts are idempotent (at least once).
        stream_wait_empty=False,
    )


def _transport_with_fetch_wait(fetch_max_wait_ms: int):
    """Faust's aiokafka transport with the consumer's fetch wait made configurable.

    Faust hard-codes ``fetch_max_wait_ms=1500``. A broker that holds a fetch
    for its whole window when little data is waiting (Tansu does) then adds up
    to that much latency to every lightly loaded hop; on Apache Kafka a fetch
    returns as soon as data arrives, so a short wait costs only idle polls.
    """
    from faust.transport.drivers import aiokafka as faust_aiokafka

    class ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
        def _create_worker_consumer(self, transport):
            consumer = super()._create_worker_consumer(transport)
            consumer._fetch_max_wait_ms = fetch_max_wait_ms  # read when the fetcher starts
            return consumer

    class Consumer(faust_aiokafka.Consumer):
        def _new_consumer_thread(self):
            return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    class Transport(faust_aiokafka.Transport):
        pass

    Transport.Consumer = Consumer
    return Transport


class HybridApp(faust.App):
    fetch_max_wait_ms: int = 1500

    def _new_transport(self):
        return _transport_with_fetch_wait(self.fetch_max_wait_ms)(self.conf.broker_consumer, self)

