"""Read the topology (topics, partitions, retention, schemas) from ``topics.yaml``.

The file ships inside the package (``hybridrag.agents.kafka/topics.yaml``, a
link to the repository's top-level ``topics.yaml`` in a checkout);
``HYBRIDRAG_TOPICS_FILE`` points at another one.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

DLQ_SUFFIX = ".dlq"


def topics_file_text(path: str | None = None) -> str:
    """The topology's YAML: ``path``, else ``$HYBRIDRAG_TOPICS_FILE``, else the packaged ``topics.yaml``."""
    path = path or os.environ.get("HYBRIDRAG_TOPICS_FILE")
    if path:
        return Path(path).read_text()
    return resources.files(__package__).joinpath("topics.yaml").read_text()


@dataclass(frozen=True)
class TopicSpec:
    logical: str  # the name in topics.yaml, e.g. "queries"
    name: str  # the name on the broker: prefix + logical
    partitions: int
    retention_ms: int
    schema: str  # dotted path of the pydantic model
    key: str
    description: str
    replication_factor: int

    @property
    def dlq(self) -> str:
        return self.name + DLQ_SUFFIX


@dataclass(frozen=True)
class Topology:
    topics: dict[str, TopicSpec]
    dlq_retention_ms: int

    def __getitem__(self, logical: str) -> TopicSpec:
        try:
            return self.topics[logical]
        except KeyError:
            raise KeyError(f"{logical} is not a topic in topics.yaml ({', '.join(self.topics)})") from None

    def all_names(self) -> list[tuple[str, int, int, int]]:
        """Every topic to create: (name, partitions, replication, retention_ms), DLQs included."""
        out = []
        for spec in self.topics.values():
            out.append((spec.name, spec.partitions, spec.replication_factor, spec.retention_ms))
            out.append((spec.dlq, 1, spec.replication_factor, self.dlq_retention_ms))
        return out


@functools.lru_cache(maxsize=32)
def load_topology(prefix: str = "", replication_factor: int | None = None, path: str | None = None) -> Topology:
    raw = yaml.safe_load(topics_file_text(path))
    defaults = raw.get("defaults", {})
    rf = replication_factor or int(defaults.get("replication_factor", 1))
    topics = {}
    for logical, spec in raw["topics"].items():
        topics[logical] = TopicSpec(
            logical=logical,
            name=prefix + logical,
            partitions=int(spec["partitions"]),
            retention_ms=int(spec["retention_ms"]),
            schema=spec["schema"],
            key=spec["key"],
            description=spec.get("description", ""),
            replication_factor=rf,
        )
    return Topology(topics=topics, dlq_retention_ms=int(defaults.get("dlq_retention_ms", 1209600000)))
