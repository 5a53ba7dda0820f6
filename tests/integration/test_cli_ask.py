"""`hybridrag ask` against a running worker: a query the worker dead-letters is reported at once."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.conftest import settings_env

pytestmark = pytest.mark.integration


def test_ask_prints_the_dead_letter_reason_at_once(make_settings, make_worker):
    """The worker accepts queries up to 40 characters; `ask` with a longer one gets the worker's reason
    from queries.dlq (matched by its query_id) in one line and exit code 1, long before its 60 s timeout."""
    settings = make_settings(max_query_chars=40)
    make_worker(settings)
    question = "What is the difference between a compiler and an interpreter, in detail?"
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "hybridrag.agents.cli.main", "ask", "--timeout", "60", question],
                         env=settings_env(settings), capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 1, out.stderr
    assert len(lines) == 1 and "rejected query" in lines[0] and "40" in lines[0], out.stderr
    assert elapsed < 30, elapsed
