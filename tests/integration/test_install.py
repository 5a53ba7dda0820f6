"""The wheel, installed non-editable into a fresh virtual environment, works from outside the checkout.

It carries one top-level name (``hybridrag``), its topology, its checkpoints and
its demo resources; the ``hybridrag`` command runs from an empty directory; and
a worker started from that install answers a question on the embedded broker.
The fresh environment sees this environment's dependencies (torch and the rest)
through a path file, so nothing is downloaded.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from hybridrag.agents.kafka.client import AsyncClient
from hybridrag.agents.kafka.schemas import Document
from hybridrag.agents.worker_process import stop_worker, wait_healthy
from tests.conftest import run, settings_env

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed (no deps, no index); returns its bin directory."""
    root = tmp_path_factory.mktemp("install")
    dist = root / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(REPO)], check=True, cwd=root)
    (wheel,) = dist.glob("hybridrag-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert z.read(top_level).decode().split() == ["hybridrag"]
    for shipped in ("hybridrag/agents/kafka/topics.yaml", "hybridrag/models/checkpoints/hybrid.pt",
                    "hybridrag/agents/resources/demo/corpus.jsonl", "hybridrag/agents/resources/contract/asyncapi.yaml",
                    "hybridrag/agents/resources/contract/schemas/query.v1.json"):
        assert shipped in names, shipped
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    # this environment's dependencies, after the venv's own site-packages (a plain path: its .pth files,
    # the editable install of this checkout among them, are not read)
    (purelib / "_hybridrag_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps",
                    "--no-index", "-q", str(wheel)], check=True)
    return venv / "bin"


def clean_env(**extra: str) -> dict:
    """The environment without any HYBRIDRAG_ setting or PYTHONPATH, so defaults apply."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYBRIDRAG_") and k != "PYTHONPATH"}
    return {**env, **extra}


def hybridrag(bin_dir: Path, *args: str, cwd: Path) -> str:
    out = subprocess.run([str(bin_dir / "hybridrag"), *args], cwd=cwd, env=clean_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_the_installed_command_runs_outside_the_checkout(installed, tmp_path):
    """--version, the topology from the packaged topics.yaml, and settings whose data_dir is ./data here."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    where = subprocess.run([str(installed / "python"), "-c", "import hybridrag.agents; print(hybridrag.agents.__file__)"],
                           cwd=outside, env=clean_env(), capture_output=True, text=True, check=True).stdout
    assert str(installed.parent) in where and str(REPO) not in where
    assert hybridrag(installed, "--version", cwd=outside).startswith("hybridrag ")
    topics = hybridrag(installed, "topics", "list", cwd=outside)
    assert "queries" in topics and "hybridrag.agents.kafka.schemas.Query" in topics
    settings = hybridrag(installed, "settings", cwd=outside)
    assert str(outside / "data") in settings
    hybridrag(installed, "schemas", "--out", "contract", cwd=outside)
    assert (outside / "contract/asyncapi.yaml").read_text() == (REPO / "asyncapi.yaml").read_text()
    assert (outside / "contract/schemas/dead-letter.v1.json").is_file()


def test_a_worker_from_the_install_answers_a_question(installed, make_settings, tmp_path):
    """A worker started by the installed command indexes a document and answers a question about it."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    settings = make_settings()
    env = {k: v for k, v in settings_env(settings).items() if k != "PYTHONPATH"}
    log = open(tmp_path / "worker.log", "ab")
    proc = subprocess.Popen([str(installed / "hybridrag"), "worker"], cwd=outside, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    doc = Document(doc_id="tansu", title="Tansu", text="Tansu is a Kafka-compatible broker that stores its log in "
                   "object storage or a database, written in Rust.")

    def explain() -> str:
        return (tmp_path / "worker.log").read_text(errors="replace")[-3000:]

    async def publish():
        async with AsyncClient(settings) as c:
            await c.publish_documents([doc])

    async def ask():
        async with AsyncClient(settings) as c:
            return await c.ask("Which broker is written in Rust?", timeout_s=60)

    try:
        wait_healthy(settings.web_port, proc, timeout_s=180, explain=explain)
        run(publish())
        wait_healthy(settings.web_port, proc, min_rows=1, timeout_s=120, explain=explain)
        answer = run(ask())
    finally:
        stop_worker(proc)
    assert "tansu" in [s.doc_id for s in answer.sources]
