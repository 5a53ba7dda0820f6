"""Errors a person can act on: each expected failure of the command line is one line on stderr
that names the cause and the fix, and exits with its documented code; --debug shows the traceback.

The commands run in this process through ``main(argv)``; no broker, Redis or Milvus is started:
an unreachable address stands for each one being down.
"""

from __future__ import annotations

import logging
import re
import socket
from pathlib import Path

import pytest

from hybridrag.agents.cli.errors import EXIT_CODES
from hybridrag.agents.cli.main import main

REPO = Path(__file__).resolve().parents[2]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


@pytest.fixture
def cli(monkeypatch, capsys, tmp_path):
    """Run `hybridrag ARGS` with ENV; return (exit code, stdout, stderr)."""
    for name in list(__import__("os").environ):
        if name.startswith("HYBRIDRAG_") or name in ("KAFKA_BOOTSTRAP_SERVERS", "REDIS_URL"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HYBRIDRAG_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HYBRIDRAG_MILVUS_URI", str(tmp_path / "data" / "milvus.db"))
    levels = {n: logging.getLogger(n).level for n in ("aiokafka", "kafka", "faust", "mode")}

    def run(*args: str, **env: str) -> tuple[int, str, str]:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        with pytest.raises(SystemExit) as e:
            main(list(args))
        out = capsys.readouterr()
        return e.value.code or 0, out.out, out.err

    yield run
    for n, level in levels.items():
        logging.getLogger(n).setLevel(level)


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("hybridrag: ") and "Fix: " in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("command", [["ask", "what is a compiler"], ["worker"], ["topics", "create"],
                                     ["reindex", "--encoder", "original"]])
def test_an_unreachable_broker_is_one_line_and_exit_3(cli, command):
    code, _, err = cli(*command, KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{closed_port()}")
    assert code == 3
    assert "cannot reach the Kafka broker at 127.0.0.1:" in one_line(err)


@pytest.mark.parametrize("env, named", [
    ({"HYBRIDRAG_TOP_K": "-5"}, "HYBRIDRAG_TOP_K='-5'"),
    ({"HYBRIDRAG_SYNTH_SAMPLE_RATE": "7"}, "HYBRIDRAG_SYNTH_SAMPLE_RATE='7'"),
    ({"HYBRIDRAG_WEB_PORT": "99999"}, "HYBRIDRAG_WEB_PORT='99999'"),
    ({"HYBRIDRAG_LOG_LEVEL": "verbose"}, "HYBRIDRAG_LOG_LEVEL='verbose'"),
    ({"HYBRIDRAG_GENERATOR": "gpt"}, "HYBRIDRAG_GENERATOR='gpt'"),
])
def test_a_bad_setting_is_one_line_naming_the_variable_and_exit_2(cli, env, named):
    code, _, err = cli("ask", "x", KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1", **env)
    assert code == 2 and named in one_line(err)


def test_settings_carry_bounds_and_choices():
    from pydantic import ValidationError

    from hybridrag.agents.settings import Settings

    for bad in ({"top_k": 0}, {"min_score": 2}, {"synth_sample_rate": -0.1}, {"web_port": 0},
                {"openai_concurrency": 0}, {"log_level": "loud"}, {"device": "gpu"}):
        with pytest.raises(ValidationError):
            Settings(**bad)
    assert Settings(log_level="DEBUG").log_level == "debug"
    assert Settings(web_port=65535, synth_sample_rate=1.0, top_k=1).top_k == 1


def test_a_milvus_path_that_cannot_be_written_is_exit_5_before_any_broker(cli):
    code, _, err = cli("worker", KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1", HYBRIDRAG_MILVUS_URI="/proc/1/nope/milvus.db")
    assert code == 5 and "HYBRIDRAG_MILVUS_URI" in one_line(err)


def test_redis_down_is_exit_4(cli):
    code, _, err = cli("memory", "stats", REDIS_URL=f"redis://127.0.0.1:{closed_port()}/0")
    assert code == 4 and "REDIS_URL" in one_line(err)


def test_ingest_checks_the_path_before_connecting(cli):
    """The broker is unreachable too; the error is about the path, so nothing was tried on the broker."""
    code, _, err = cli("ingest", "/nonexistent/docs", KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1")
    assert code == 2 and "/nonexistent/docs does not exist" in one_line(err)


def test_ingest_rejects_a_pdf_with_a_reason(cli, tmp_path):
    pdf = tmp_path / "paper.pdf"
    pdf.write_bytes(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n")
    code, _, err = cli("ingest", str(pdf), KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1")
    assert code == 2 and "is a PDF, not text" in one_line(err) and "pdftotext" in err


def test_ingest_validates_a_jsonl_file_whole_before_publishing_any_of_it(cli, tmp_path):
    """Line 3 is bad: the command fails on it before connecting, so lines 1-2 were not published either."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"_id": "a", "text": "one"}\n{"_id": "b", "text": "two"}\n{"_id": "c", "text": \n')
    code, _, err = cli("ingest", str(corpus), KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1")
    line = one_line(err)
    assert code == 2 and f"{corpus}:3: not JSON" in line and "nothing was published" in line


def test_ingest_of_a_folder_without_text_files_says_so(cli, tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "scan.png").write_bytes(b"\x89PNG\r\n")
    code, _, err = cli("ingest", str(tmp_path / "docs"), KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1")
    assert code == 2 and "holds no .jsonl, .md, .txt files" in one_line(err)


def test_debug_lets_the_exception_through(cli, monkeypatch):
    from hybridrag.agents.cli.errors import CliError

    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", f"127.0.0.1:{closed_port()}")
    with pytest.raises(CliError, match="cannot reach the Kafka broker"):
        main(["ask", "x", "--debug"])  # accepted after the command too


def test_debug_prints_the_traceback_from_the_installed_command():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("HYBRIDRAG_")}
    env["KAFKA_BOOTSTRAP_SERVERS"] = f"127.0.0.1:{closed_port()}"
    quiet = subprocess.run([sys.executable, "-m", "hybridrag.agents.cli.main", "ask", "x"], env=env,
                           capture_output=True, text=True, timeout=120)
    loud = subprocess.run([sys.executable, "-m", "hybridrag.agents.cli.main", "--debug", "ask", "x"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 3 and len(quiet.stderr.strip().splitlines()) == 1, quiet.stderr
    assert loud.returncode != 0 and "Traceback (most recent call last)" in loud.stderr


def test_version_still_prints(cli):
    code, out, _ = cli("--version")
    assert code == 0 and re.fullmatch(r"hybridrag \d+\.\d+\.\d+\S*\n", out)


def test_the_readme_documents_every_exit_code():
    readme = (REPO / "README.md").read_text()
    for code, meaning in EXIT_CODES.items():
        assert f"| {code} | {meaning} |" in readme, code
