"""Models already in Ollama as sources: ``ollama:NAME[:TAG]`` finds, checks and imports the blob."""
from __future__ import annotations

import shutil

import pytest

from helpers import assert_clean_error, cli
from ollama_compress.options import RunOptions
from ollama_compress.errors import UserError
from ollama_compress.hooks import modelfile as mf
from ollama_compress.hooks import registration as reg
from ollama_compress.hooks.ollama_source import resolve_ollama_model, split_name
from ollama_fixtures import ollama_binary, ollama_server  # noqa: F401

pytestmark = pytest.mark.ollama


@pytest.mark.parametrize("name, parts", [
    ("smollm2", ("registry.ollama.ai", "library/smollm2", "latest")),
    ("smollm2:Q4_K_M", ("registry.ollama.ai", "library/smollm2", "Q4_K_M")),
    ("me/tiny:v1", ("registry.ollama.ai", "me/tiny", "v1")),
    ("example.com/me/tiny", ("example.com", "me/tiny", "latest")),
])
def test_names_split_with_ollamas_defaults(name, parts):
    assert split_name(name) == parts


@pytest.fixture(scope="module")
def installed(ollama_server, smollm2_gguf, tmp_path_factory):  # noqa: F811
    path = mf.write_modelfile(smollm2_gguf, tmp_path_factory.mktemp("mf") / "Modelfile.Q4_1", None)
    reg.create_model(ollama_server.client(), "src-test:q", mf.parse_modelfile(path))
    return ollama_server


def test_an_installed_model_resolves_to_its_verified_blob(installed, smollm2_gguf, capsys):
    blob = resolve_ollama_model("src-test:q", RunOptions(), host=installed.host)
    assert blob.read_bytes() == smollm2_gguf.read_bytes()
    assert "is quantized (Q4_1)" in capsys.readouterr().err
    # with no server answering, the manifest in the models directory leads to the same blob
    offline = resolve_ollama_model("src-test:q", RunOptions(), host="127.0.0.1:9",
                                   models_dir=installed.models_dir)
    assert offline == blob


def test_missing_models_and_damaged_blobs_are_refused(installed, tmp_path):
    with pytest.raises(UserError, match="not installed in the Ollama at"):
        resolve_ollama_model("no-such-model", RunOptions(), host=installed.host)
    with pytest.raises(UserError, match="not installed in"):
        resolve_ollama_model("no-such-model", RunOptions(), host="127.0.0.1:9", models_dir=installed.models_dir)
    blob = resolve_ollama_model("src-test:q", RunOptions(), host=installed.host)
    damaged = tmp_path / blob.name
    shutil.copy(blob, damaged)
    with open(damaged, "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 0xFF]))
    from ollama_compress.hooks.ollama_source import check_blob

    with pytest.raises(UserError, match="the blob is damaged"):
        check_blob(damaged)


def test_the_analyze_command_takes_an_ollama_source(installed, tmp_path):
    proc = cli("analyze", "ollama:src-test:q", "--samples", "2", "--seq-len", "16", "--json",
               "--out", tmp_path / "a", env={"OLLAMA_HOST": installed.host})
    assert proc.returncode == 0, proc.stderr
    assert "is quantized" in proc.stderr
    assert_clean_error(cli("analyze", "ollama:not-there", "--out", tmp_path / "b",
                           env={"OLLAMA_HOST": installed.host}), "not installed")
