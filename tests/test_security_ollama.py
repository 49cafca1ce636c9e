"""Talking to Ollama: loopback by default, nothing from the environment sent, blob digests checked,
registration idempotent."""
from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from gguf_samples import write_small_gguf
from helpers import recipe_dict
from ollama_compress.errors import StageFailed, UserError
from ollama_compress.hooks import registration
from ollama_compress.hooks.modelfile import ModelfileSpec, chat_family
from ollama_compress.hosts import is_loopback, normalize_host
from ollama_compress.ollama_server import make_client

SECRET = "sk-do-not-send-0123456789"


class Recorder(BaseHTTPRequestHandler):
    """Just enough of Ollama's API for a registration; records every request."""

    requests: list[dict] = []

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        Recorder.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
        if self.path.startswith("/api/blobs/"):
            self._answer(201, {})
        elif self.path == "/api/show":  # the created model, from the last blob uploaded
            blobs = [r["path"].rsplit("/", 1)[1] for r in Recorder.requests if r["path"].startswith("/api/blobs/")]
            self._answer(200, {"modelfile": f"FROM /models/blobs/{blobs[-1].replace(':', '-')}" if blobs else "",
                               "model_info": {}})
        else:
            self._answer(200, {"status": "success"})

    def do_DELETE(self):  # noqa: N802
        Recorder.requests.append({"path": self.path, "headers": dict(self.headers), "body": b""})
        self._answer(200, {})

    def do_HEAD(self):  # noqa: N802
        Recorder.requests.append({"path": self.path, "headers": dict(self.headers), "body": b""})
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def recorder():
    Recorder.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def spec(tmp_path) -> ModelfileSpec:
    family = chat_family("chatml")
    return ModelfileSpec(write_small_gguf(tmp_path / "m.gguf"), family.template, "Be brief.", {"stop": family.stops})


def test_the_default_host_is_loopback(monkeypatch):
    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    assert normalize_host(None) == "http://127.0.0.1:11434"
    assert is_loopback(None)
    assert normalize_host("0.0.0.0:11434") == "http://127.0.0.1:11434"  # a bind-all address is reached locally
    assert not is_loopback("http://203.0.113.9:11434") and not is_loopback("ollama.example.com")


def test_registration_sends_no_credentials_and_nothing_from_the_environment(recorder, spec, tmp_path, monkeypatch):
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1 login user password {SECRET}\n")
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("OLLAMA_API_KEY", SECRET)
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # a proxy that would swallow the requests
    monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "")
    name = registration.create_model(make_client(recorder), "fuzz:Q8_0", spec)
    assert name == "fuzz:Q8_0"
    paths = [r["path"] for r in Recorder.requests]
    digest = hashlib.sha256(spec.from_path.read_bytes()).hexdigest()
    assert f"/api/blobs/sha256:{digest}" in paths and "/api/create" in paths
    for request in Recorder.requests:
        headers = {k.lower(): v for k, v in request["headers"].items()}
        assert "authorization" not in headers and "proxy-authorization" not in headers, headers
        assert SECRET not in json.dumps(headers)
    create = json.loads(next(r["body"] for r in Recorder.requests if r["path"] == "/api/create"))
    assert create["files"] == {spec.from_path.name: f"sha256:{digest}"}
    assert SECRET not in json.dumps(create)


def test_a_gguf_that_changes_during_the_upload_is_not_registered(recorder, spec):
    class SwappingClient(type(make_client(recorder))):
        """Another process rewrites the file between our check and the upload."""

        def create_blob(self, path):
            Path(path).write_bytes(Path(path).read_bytes()[:-32] + b"\1" * 32)
            return super().create_blob(path)

    client = SwappingClient(host=recorder, trust_env=False)
    with pytest.raises(StageFailed, match="changed while it was uploaded"):
        registration.create_model(client, "fuzz:Q8_0", spec)
    assert "/api/create" not in [r["path"] for r in Recorder.requests]


@pytest.mark.ollama
def test_registering_twice_gives_the_same_model(tmp_path, smollm2_gguf):
    from ollama_fixtures import require_ollama
    from ollama_compress.ollama_server import OllamaServer

    binary = require_ollama()
    run = tmp_path / "run"
    run.mkdir()
    (run / "smol-Q4_1.gguf").symlink_to(smollm2_gguf)
    with OllamaServer(binary, models_dir=tmp_path / "models") as server:
        first = registration.register_path(run, "twice", host=server.host)
        client = server.client()
        before = {m.model: m.digest for m in client.list().models}
        second = registration.register_path(run, "twice", host=server.host)
        after = {m.model: m.digest for m in client.list().models}
    assert first == second == ["twice:Q4_1"]
    assert after == before and list(after) == ["twice:Q4_1"]


# ---------------------------------------------------------------- whole values, local hosts, digests
@pytest.mark.parametrize("host", ["127.0.0.1.example.org", "127.0.0.1.nip.io:11434", "http://localhost.example.org",
                                  "localhost.", "http://[::ffff:10.0.0.1]:11434", "10.0.0.1", "127.1.example"])
def test_a_name_that_only_looks_local_is_remote(host):
    from ollama_compress.recipe import RecipeError, validate

    assert not is_loopback(host)
    with pytest.raises(RecipeError):
        validate(recipe_dict("x", "demo", ollama={"host": host}), "test")


@pytest.mark.parametrize("host", ["127.0.0.1", "127.9.8.7:8080", "http://localhost:11434", "[::1]:11434", "LOCALHOST"])
def test_loopback_ip_literals_and_localhost_are_local(host):
    assert is_loopback(host)


@pytest.mark.parametrize("field, value", [("ollama.name", "demo\n"), ("ollama.name", "demo:q4\n"), ("name", "demo\n")])
def test_a_trailing_line_break_is_not_part_of_a_valid_name(field, value):
    from ollama_compress.recipe import RecipeError, validate

    data = recipe_dict("x", "demo", ollama={})
    section, _, key = field.rpartition(".")
    (data[section] if section else data)[key] = value
    with pytest.raises(RecipeError):
        validate(data, "test")
    with pytest.raises(UserError):
        registration.check_model_name("demo\n")


def test_a_parameter_name_with_a_trailing_line_break_is_refused():
    from ollama_compress.hooks.modelfile import merged_parameters

    with pytest.raises(UserError, match="not a Modelfile parameter name"):
        merged_parameters([], {"temperature\n": 0.5})
    assert merged_parameters([], {"temperature": 0.5}) == [("temperature", 0.5)]


def _blob(folder: Path) -> Path:
    gguf = write_small_gguf(folder / "model.gguf")
    blob = folder / f"sha256-{hashlib.sha256(gguf.read_bytes()).hexdigest()}"
    gguf.rename(blob)
    return blob


def test_a_blob_rewritten_in_place_is_caught_on_the_next_read(tmp_path, monkeypatch):
    """Same size, same mtime, other bytes: a size+mtime cache would say 'unchanged'."""
    import os

    from ollama_compress.hooks.ollama_source import check_blob

    monkeypatch.setenv("OLLAMA_COMPRESS_CACHE", str(tmp_path / "cache"))
    blob = _blob(tmp_path)
    assert check_blob(blob) == blob
    st = blob.stat()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # a weight byte
    blob.write_bytes(bytes(data))
    os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(UserError, match="sha256"):
        check_blob(blob)


@pytest.mark.parametrize("digest", ["sha256:../../../etc/passwd", "sha256:abc", "md5:" + "0" * 64, 7])
def test_a_manifest_digest_that_is_not_a_sha256_is_refused(tmp_path, digest):
    from ollama_compress.hooks.ollama_source import blob_from_manifest

    manifest = tmp_path / "manifests" / "registry.ollama.ai" / "library" / "demo" / "latest"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"layers": [{"mediaType": "application/vnd.ollama.image.model", "digest": digest}]}))
    with pytest.raises(UserError, match="digest"):
        blob_from_manifest("demo", tmp_path)
