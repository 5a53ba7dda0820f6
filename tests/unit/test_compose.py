"""docker-compose.yml and the Dockerfile: no Docker engine runs here, so check what can be checked.

``docker-compose config`` (Debian's docker-compose package) validates the file
against the Compose schema when the binary exists; the structural tests check
what a schema cannot: that the stack would start and keep its state.
"""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed (apt-get install docker-compose)")
def test_docker_compose_accepts_the_file():
    """The file passes `docker-compose config -q` (schema, anchors, depends_on conditions)."""
    out = subprocess.run(["docker-compose", "-f", str(REPO / "docker-compose.yml"), "config", "-q"],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr


def test_production_services_are_all_there_with_health_checks():
    for name in ("kafka", "redis", "etcd", "minio", "milvus", "topics", "worker"):
        assert name in SERVICES, name
    for name in ("kafka", "redis", "etcd", "minio", "milvus", "worker"):
        assert "healthcheck" in SERVICES[name], name
    assert SERVICES["kafka"]["image"].startswith("apache/kafka")
    assert "KAFKA_PROCESS_ROLES" in SERVICES["kafka"]["environment"]  # KRaft, no ZooKeeper


def test_health_checks_need_no_curl():
    """curl is not in every image on every architecture (MinIO's, Milvus's)."""
    for name, svc in SERVICES.items():
        test = svc.get("healthcheck", {}).get("test", [])
        assert "curl" not in " ".join(test), name
    assert SERVICES["minio"]["healthcheck"]["test"][1:] == ["mc", "ready", "local"]


def test_minio_uses_the_current_credential_names():
    env = SERVICES["minio"]["environment"]
    assert {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"} <= set(env)
    assert not {"MINIO_ACCESS_KEY", "MINIO_SECRET_KEY"} & set(env)


def test_kafka_writes_its_log_dirs_to_the_volume():
    """apache/kafka logs to /tmp unless told otherwise; the volume must be where it writes."""
    kafka = SERVICES["kafka"]
    log_dirs = kafka["environment"]["KAFKA_LOG_DIRS"]
    mounts = [v.split(":")[1] for v in kafka["volumes"]]
    assert any(log_dirs == m or log_dirs.startswith(m.rstrip("/") + "/") for m in mounts), (log_dirs, mounts)


def test_workers_and_topics_job_run_the_built_image():
    """The package is installed at build time; nothing pip-installs into a read-only mount at run time."""
    for name in ("topics", "worker"):
        svc = SERVICES[name]
        assert svc["build"] == "." and svc["image"] == SERVICES["worker"]["image"], name
        assert not any(":/app" in v for v in svc.get("volumes", [])), name
        assert "pip" not in " ".join(svc["command"]), name
    assert SERVICES["topics"]["command"] == ["topics", "create"]


def test_workers_are_scalable_restartable_and_scrapeable():
    worker = SERVICES["worker"]
    assert "ports" not in worker and "container_name" not in worker  # --scale needs neither
    assert worker["restart"] in ("always", "unless-stopped", "on-failure")
    assert worker["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    assert {"redis", "milvus"} <= set(worker["depends_on"])
    env = worker["environment"]
    assert env["HYBRIDRAG_MILVUS_URI"].startswith("http://")  # a server, shared by every worker
    assert env["HYBRIDRAG_WEB_HOST"] == "0.0.0.0"  # /metrics from outside the container


def test_state_lives_in_volumes():
    for name in ("kafka", "redis", "milvus", "etcd", "minio"):
        assert SERVICES[name].get("volumes"), name


def test_dockerfile_pins_cpu_torch_and_installs_the_package_at_build_time():
    text = (REPO / "Dockerfile").read_text()
    assert "torch==${TORCH_VERSION}" in text and "whl/cpu" in text
    assert "ARG TORCH_VERSION=2.13.0" in text
    assert "pip install -c /etc/torch-constraint.txt ." in text
    assert 'ENTRYPOINT ["hybridrag"]' in text
    ignored = (REPO / ".dockerignore").read_text().split()
    for needed in ("!pyproject.toml", "!README.md", "!topics.yaml", "!agents/", "!models/"):
        assert needed in ignored, needed
