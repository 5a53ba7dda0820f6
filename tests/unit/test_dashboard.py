"""The Grafana dashboard and the Prometheus that feeds it (dashboards/), against what the worker serves.

Every metric a panel queries must be one the worker's registry serves (the
integration test in tests/contract scrapes a real worker's /metrics with the
same check), so a renamed metric cannot leave a panel silently empty.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from hybridrag.agents.kafka import metrics

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = json.loads((REPO / "dashboards/grafana/hybridrag.json").read_text())
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
# series Prometheus itself makes for every target, not the worker
PROMETHEUS_OWN = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
FUNCTIONS = {"sum", "rate", "increase", "histogram_quantile", "max", "count", "by", "le", "label_values", "instance"}


def dashboard_exprs(dashboard: dict = DASHBOARD) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"]]
    return exprs


def queried_metrics(exprs: list[str]) -> set[str]:
    """Metric names in PromQL expressions: identifiers followed by a selector or range, minus labels."""
    names = set()
    for expr in exprs:
        stripped = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"", " ", expr)  # selectors, ranges, strings
        stripped = re.sub(r"by \([^)]*\)", " ", stripped)
        names |= {w for w in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", stripped)} - FUNCTIONS
    return names


def served_metric_names(families) -> set[str]:
    """The series names a set of metric families exposes, labelled or not, samples yet or not."""
    names = set()
    for fam in families:
        if fam.type == "counter":
            names |= {fam.name + "_total", fam.name + "_created"}
        elif fam.type == "histogram":
            names |= {fam.name + s for s in ("_bucket", "_sum", "_count", "_created")}
        else:
            names.add(fam.name)
    return names


def test_every_queried_metric_is_served_by_the_worker_registry():
    queried = queried_metrics(dashboard_exprs())
    served = served_metric_names(metrics.REGISTRY.collect())
    assert queried - PROMETHEUS_OWN <= served, sorted(queried - PROMETHEUS_OWN - served)
    assert len(queried) >= 15


def test_the_extraction_finds_names_not_functions_or_labels():
    assert queried_metrics(['histogram_quantile(0.99, sum by (le, agent) (rate(a_bucket{x="y"}[5m])))',
                            'sum(b_total{instance=~"$instance"}) / count(up{job="w"} == 1)']) == {"a_bucket", "b_total", "up"}


def test_the_dashboard_covers_the_service():
    """Answers/s, latency quantiles, batch sizes, lag, dead letters by topic, index rows, memory, the learner."""
    text = " ".join(dashboard_exprs())
    for needed in ("rate(hybridrag_answer_latency_seconds_count", "histogram_quantile(0.99",
                   "hybridrag_batch_size_", "hybridrag_consumer_lag", "sum by (topic, error_type) (increase(hybridrag_dead_letters_total",
                   "hybridrag_mirror_rows", "hybridrag_evictions_total", "hybridrag_memory_buffered_updates",
                   "hybridrag_learner_updates_total", "hybridrag_encoder_info"):
        assert needed in text, needed
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))


def test_prometheus_finds_every_worker_replica_by_dns():
    """`--scale worker=N`: Docker's DNS returns one A record per replica of the service name."""
    svc = COMPOSE["prometheus"]
    host_path = next(v.split(":")[0] for v in svc["volumes"] if v.endswith("/etc/prometheus/prometheus.yml:ro"))
    prom = yaml.safe_load((REPO / host_path).read_text())
    [job] = prom["scrape_configs"]
    [sd] = job["dns_sd_configs"]
    assert sd["names"] == ["worker"] and sd["type"] == "A" and "worker" in COMPOSE
    assert str(sd["port"]) in COMPOSE["worker"]["expose"] and job["metrics_path"] == "/metrics"
    assert COMPOSE["worker"]["environment"]["HYBRIDRAG_WEB_HOST"] == "0.0.0.0"


def test_grafana_provisions_the_datasource_and_the_dashboard():
    mounts = dict(v.rsplit(":", 2)[:2] for v in COMPOSE["grafana"]["volumes"] if v.startswith("./"))
    provisioning = REPO / next(h for h, c in mounts.items() if c == "/etc/grafana/provisioning")
    [ds] = yaml.safe_load((provisioning / "datasources/prometheus.yml").read_text())["datasources"]
    uids = {p["datasource"]["uid"] for p in DASHBOARD["panels"] if "datasource" in p}
    assert uids == {ds["uid"]} and ds["url"] == "http://prometheus:9090"
    [provider] = yaml.safe_load((provisioning / "dashboards/hybridrag.yml").read_text())["providers"]
    dash_dir = next(h for h, c in mounts.items() if c == provider["options"]["path"])
    assert (REPO / dash_dir / "hybridrag.json").exists()
