"""A real ``ollama serve`` for tests: import the fixtures into a test module.

    from ollama_fixtures import ollama_binary, ollama_server  # noqa: F401

``ollama_server`` starts one server per test module on a free port with a temporary
OLLAMA_MODELS and trace logging (the rendered prompts land in its log). Without an ollama
binary the tests FAIL with a clear message (CI builds it first with .ci/install-ollama); they
are skipped only when OLLAMA_COMPRESS_SKIP_OLLAMA=1 is set explicitly.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from ollama_compress.ollama_server import OllamaServer, find_ollama

SKIP_ENV = "OLLAMA_COMPRESS_SKIP_OLLAMA"
# Options for every test request (the same everywhere, so the model runner is loaded once).
# One thread: on a busy 2-core machine ggml's two spinning threads stall each other
# (measured 1.2 tokens/s with two threads against 78 with one).
RUNNER_OPTIONS = {"num_ctx": 512, "num_thread": 1}
_PROMPT = re.compile(r'msg="completion request".*? prompt=("(?:[^"\\]|\\.)*")')


def require_ollama() -> Path:
    """The ollama binary, or fail (skip only with OLLAMA_COMPRESS_SKIP_OLLAMA=1)."""
    found = find_ollama()
    if found is None:
        if os.environ.get(SKIP_ENV) == "1":
            pytest.skip(f"no ollama binary and {SKIP_ENV}=1")
        pytest.fail(
            "no ollama binary on PATH or in $(go env GOPATH)/bin: run 'bash .ci/install-ollama' "
            f"(CI does), or set {SKIP_ENV}=1 to skip the Ollama tests explicitly",
            pytrace=False,
        )
    return found


@pytest.fixture(scope="module")
def ollama_binary() -> Path:
    return require_ollama()


@pytest.fixture(scope="module")
def ollama_server(ollama_binary, tmp_path_factory):
    state = tmp_path_factory.mktemp("ollama")
    env = {"OLLAMA_DEBUG": "2", "OLLAMA_NUM_PARALLEL": "1", "OLLAMA_MAX_LOADED_MODELS": "1"}
    server = OllamaServer(
        ollama_binary, models_dir=state / "models", log_path=state / "serve.log", env=env, startup_timeout=120
    )
    with server:
        yield server


def rendered_prompts(server: OllamaServer) -> list[str]:
    """Every prompt the server sent to its model runner so far, in order (needs OLLAMA_DEBUG=2)."""
    text = server.log_path.read_text(errors="replace")
    return [json.loads(m.group(1)) for m in _PROMPT.finditer(text)]
