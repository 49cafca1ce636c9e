"""A real Ollama: start/stop ``ollama serve``, register the real SmolLM2 GGUF, chat with it,
check our templates render what the HF chat templates render, and fail cleanly on bad input."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from chat_templates import BY_FAMILY, render
from helpers import recipe_dict
from ollama_compress.errors import StageFailed, UserError
from ollama_compress.hooks import modelfile as mf
from ollama_compress.hooks import registration as reg
from ollama_compress.hosts import normalize_host
from ollama_compress.ollama_server import (
    OLLAMA_VERSION,
    OllamaServer,
    client_version,
    ensure_server,
    find_ollama,
    free_port,
    install_ollama,
    pinned_ollama_path,
    port_in_use,
    server_running,
)
from ollama_fixtures import RUNNER_OPTIONS, ollama_binary, ollama_server, rendered_prompts  # noqa: F401

pytestmark = pytest.mark.ollama
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is 2+2?"},
]
FAST = {"num_predict": 16, "temperature": 0, "seed": 0, **RUNNER_OPTIONS}


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ollama_compress", *args],
        capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})},
    )


def shown_parameters(text: str) -> dict[str, list[str]]:
    """``client.show().parameters`` ('stop    "<|im_end|>"' lines) as name -> values."""
    found: dict[str, list[str]] = {}
    for line in (text or "").splitlines():
        name, _, value = line.strip().partition(" ")
        found.setdefault(name, []).append(value.strip().strip('"'))
    return found


def model_names(client) -> set[str]:
    return {m.model for m in client.list().models}


@pytest.fixture(scope="module")
def client(ollama_server):
    return ollama_server.client()


@pytest.fixture(scope="module")
def smollm2_model(client, smollm2_gguf, tmp_path_factory) -> str:
    """SmolLM2 Q4_1 registered from a chatml Modelfile."""
    path = mf.write_modelfile(smollm2_gguf, tmp_path_factory.mktemp("mf") / "Modelfile.Q4_1", None)
    return reg.register_gguf(client, reg.model_tag("smollm2-test", "Q4_1"), path)


# ---------------------------------------------------------------- the binary
def _fake_ollama(path, version: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho 'Warning: client version is {version}'\n")
    path.chmod(0o755)
    return path


def test_pinned_build_wins_and_install_keeps_it(tmp_path, monkeypatch):
    """find_ollama prefers the pinned build over an older ollama on PATH; install_ollama does not
    rebuild a pinned binary that reports the pinned version (what .ci/install-ollama runs)."""
    monkeypatch.setenv("OLLAMA_COMPRESS_CACHE", str(tmp_path / "cache"))
    older = _fake_ollama(tmp_path / "bin" / "ollama", "0.11.4")
    monkeypatch.setenv("PATH", f"{older.parent}{os.pathsep}{os.environ['PATH']}")
    assert find_ollama() == older
    pinned = _fake_ollama(pinned_ollama_path(), OLLAMA_VERSION.removeprefix("v"))
    assert pinned.parent.parent.name == f"ollama-{OLLAMA_VERSION.removeprefix('v')}"
    assert find_ollama() == pinned
    assert install_ollama(log=lambda _: None) == pinned


# ---------------------------------------------------------------- the server itself
def test_server_starts_answers_with_pinned_version_and_stops(ollama_binary):
    with OllamaServer(ollama_binary) as server:
        port, models, pid = server.port, server.models_dir, server.process.pid
        assert server.host == f"http://127.0.0.1:{port}"
        assert client_version(server.client()) == OLLAMA_VERSION.removeprefix("v")
        assert server_running(server.host)
        assert models.is_dir()
    assert not port_in_use(port)
    assert not server_running(f"127.0.0.1:{port}")
    assert not models.exists()
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)


def test_server_that_exits_at_start_fails_with_its_log(tmp_path):
    fake = tmp_path / "ollama"
    fake.write_text("#!/bin/sh\necho 'Error: listen tcp: address already in use' >&2\nexit 1\n")
    fake.chmod(0o755)
    server = OllamaServer(fake, startup_timeout=30)
    with pytest.raises(StageFailed) as err:
        server.start()
    message = str(err.value)
    assert "exited with code 1" in message and "address already in use" in message and "\n" not in message
    assert not server.running


def test_busy_port_and_bad_models_dir_are_refused(tmp_path):
    fake = tmp_path / "ollama"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        with pytest.raises(StageFailed, match="already in use"):
            OllamaServer(fake, port=sock.getsockname()[1]).start()
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(UserError, match="models directory"):
        OllamaServer(fake, models_dir=blocker / "models").start()


def test_ensure_server_reuses_a_running_one(ollama_server):
    with ensure_server(ollama_server.host, build=False) as handle:
        assert handle.host == ollama_server.host and not handle.started


def test_ensure_server_starts_one_on_the_given_port_and_stops_it(ollama_binary, tmp_path):
    port = free_port()
    with ensure_server(f"127.0.0.1:{port}", tmp_path / "models", build=False) as handle:
        assert handle.started and handle.host == f"http://127.0.0.1:{port}"
        assert server_running(handle.host)
    assert not port_in_use(port)
    assert (tmp_path / "models").is_dir()  # the user's models directory stays


def test_normalize_host():
    assert normalize_host("127.0.0.1:5") == "http://127.0.0.1:5"
    assert normalize_host("0.0.0.0") == "http://127.0.0.1:11434"
    assert normalize_host("http://example.com:8080/") == "http://example.com:8080"


# ---------------------------------------------------------------- registering and chatting
@pytest.mark.slow
def test_registered_smollm2_is_listed_shown_and_answers(client, smollm2_model):
    assert smollm2_model == "smollm2-test:Q4_1"
    assert smollm2_model in model_names(client)
    shown = client.show(smollm2_model)
    chatml = mf.chat_family("chatml")
    assert shown.template == chatml.template
    assert shown_parameters(shown.parameters)["stop"] == chatml.stops
    assert "SmolLM" in shown.modelfile  # the default SYSTEM taken from the HF template

    reply = client.chat(smollm2_model, messages=[{"role": "user", "content": "What is the capital of France?"}], options=FAST)
    assert reply.message.content.strip()
    assert "<|im_end|>" not in reply.message.content
    completion = client.generate(smollm2_model, prompt="Name a color.", options=FAST)
    assert completion.response.strip()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["chatml", *sorted(BY_FAMILY)])
def test_ollama_renders_what_the_hf_template_renders(client, ollama_server, smollm2_model, smollm2_gguf, tmp_path, family):
    hf = BY_FAMILY.get(family) or mf.read_gguf_chat_template(smollm2_gguf)
    path = mf.write_modelfile(smollm2_gguf, tmp_path / "Modelfile", hf)
    name = reg.register_gguf(client, f"render-{family}", path)
    for messages in (CONVERSATION, CONVERSATION[1:2]):
        client.chat(name, messages=messages, options={"num_predict": 1, **RUNNER_OPTIONS})
        assert rendered_prompts(ollama_server)[-1] == render(hf, messages)


@pytest.mark.slow
def test_ollama_cli_accepts_our_modelfile(ollama_binary, ollama_server, client, smollm2_gguf, tmp_path):
    path = mf.write_modelfile(smollm2_gguf, tmp_path / "Modelfile.Q4_1", None, parameters={"num_ctx": 1024})
    env = {**os.environ, "OLLAMA_HOST": ollama_server.host.split("://")[1]}
    done = subprocess.run([str(ollama_binary), "create", "via-cli", "-f", str(path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    shown = client.show("via-cli")
    assert shown.template == mf.chat_family("chatml").template
    assert shown_parameters(shown.parameters)["num_ctx"] == ["1024"]


@pytest.mark.slow
def test_register_command_on_a_folder_tags_each_quant(client, ollama_server, smollm2_gguf, tmp_path):
    folder = tmp_path / "run" / "40-gguf"
    folder.mkdir(parents=True)
    os.symlink(smollm2_gguf, folder / "model-Q4_1.gguf")
    unfinished = tmp_path / "run" / ".50-modelfiles.tmp-1"  # an interrupted stage is ignored
    unfinished.mkdir()
    (unfinished / "Modelfile.Q8_0").write_text("half-written")
    done = cli("register", str(tmp_path / "run"), "--name", "folder-test", "--host", ollama_server.host)
    assert done.returncode == 0, done.stderr
    assert "registered folder-test:Q4_1" in done.stdout
    assert "ollama run folder-test:Q4_1" in done.stdout
    assert "folder-test:Q4_1" in model_names(client)
    done = cli("register", str(folder / "model-Q4_1.gguf"), "--name", "single", "--host", ollama_server.host,
               "--template", "phi3", "--system", "Be brief.")
    assert done.returncode == 0, done.stderr
    shown = client.show("single")
    assert shown.template == mf.chat_family("phi3").template and "Be brief." in shown.modelfile


@pytest.mark.slow
def test_register_stage_hook_names_the_quant(client, ollama_server, smollm2_gguf, tmp_path):
    from ollama_compress.context import StageContext
    from ollama_compress.plugins import get_plugin_manager
    from ollama_compress.recipe import validate

    recipe = validate(recipe_dict(smollm2_gguf, "t", ollama={"host": ollama_server.host}))
    ctx = StageContext(stage="ollama", recipe=recipe, run_dir=tmp_path, out_dir=tmp_path)
    path = mf.write_modelfile(smollm2_gguf, tmp_path / "Modelfile.Q4_1", None)
    name = get_plugin_manager().hook.create_ollama_model(ctx=ctx, modelfile=path, name="stage-test",
                                                          host=ollama_server.host)
    assert name == "stage-test:Q4_1"
    assert name in model_names(client)
    assert ctx.metrics["registered"] == [name]


# ---------------------------------------------------------------- bad input
def test_truncated_gguf_is_refused_and_creates_nothing(client, ollama_server, smollm2_gguf, tmp_path):
    bad = tmp_path / "bad-Q4_1.gguf"
    with open(smollm2_gguf, "rb") as src, open(bad, "wb") as dst:
        dst.write(src.read(5_000_000))
    before = model_names(client)
    done = cli("register", str(bad), "--name", "truncated", "--host", ollama_server.host, "--template", "chatml")
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("Error: ") and done.stderr.count("\n") == 1
    assert "GGUF" in done.stderr
    modelfile = tmp_path / "Modelfile.Q4_1"
    modelfile.write_text(f"FROM {bad}\n")
    with pytest.raises(UserError):
        reg.register_gguf(client, "truncated2", modelfile)
    assert model_names(client) == before


def test_not_a_gguf_and_bad_names_are_user_errors(client, tmp_path, smollm2_gguf):
    text = tmp_path / "notes.gguf"
    text.write_text("hello")
    modelfile = tmp_path / "Modelfile"
    modelfile.write_text(f"FROM {text}\n")
    with pytest.raises(UserError, match="GGUF"):
        reg.register_gguf(client, "notes", modelfile)
    modelfile.write_text(f"FROM {smollm2_gguf}\n")
    with pytest.raises(UserError, match="not a valid Ollama model name"):
        reg.register_gguf(client, "bad name!", modelfile)


def test_unreachable_host_is_one_line(smollm2_gguf):
    port = free_port()
    done = cli("register", str(smollm2_gguf), "--name", "nowhere", "--host", f"127.0.0.1:{port}")
    assert done.returncode == 1
    assert done.stderr.startswith(f"Error: no Ollama server at http://127.0.0.1:{port}; ")
    assert done.stderr.endswith("\n") and done.stderr.count("\n") == 1 and "ollama serve" in done.stderr
    assert "Traceback" not in done.stderr and not done.stdout
