"""Model directories and weights: safetensors only by default, no pickle loads, remote code only
from the command line with a pinned revision, nothing read from outside the model directory."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from ollama_compress.context import RunOptions
from ollama_compress.errors import UserError
from ollama_compress.modelio import check_model_dir

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "plugin").rglob("*.py")) + sorted((ROOT / "hooks").rglob("*.py"))
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}


def model_dir(root: Path, weights=("model.safetensors",), config=None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config or CONFIG))
    for name in weights:
        (root / name).write_bytes(b"\0" * 16)
    return root


def test_a_plain_directory_passes(tmp_path):
    assert check_model_dir(model_dir(tmp_path / "m")) == tmp_path / "m"


def test_pickle_only_weights_need_allow_pickle(tmp_path):
    path = model_dir(tmp_path / "m", weights=("pytorch_model.bin",))
    with pytest.raises(UserError, match="--allow-pickle"):
        check_model_dir(path)
    assert check_model_dir(path, RunOptions(allow_pickle=True)) == path


@pytest.mark.parametrize("link", ["model.safetensors", "tokenizer.json", "sub/extra.json"])
def test_a_symlink_out_of_the_directory_is_refused(tmp_path, link):
    secret = tmp_path / "elsewhere" / "secret"
    secret.parent.mkdir()
    secret.write_text("not yours")
    path = model_dir(tmp_path / "m", weights=() if link == "model.safetensors" else ("model.safetensors",))
    (path / link).parent.mkdir(exist_ok=True)
    (path / link).symlink_to(secret)
    with pytest.raises(UserError, match="symlink to .*outside the model directory"):
        check_model_dir(path)


def test_symlinks_inside_and_the_hub_cache_layout_are_fine(tmp_path):
    path = model_dir(tmp_path / "m")
    (path / "alias.safetensors").symlink_to(path / "model.safetensors")
    assert check_model_dir(path) == path
    repo = tmp_path / "hub" / "models--org--name"
    blob = repo / "blobs" / "abc123"
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"\0" * 16)
    snapshot = model_dir(repo / "snapshots" / ("0" * 40), weights=())
    (snapshot / "model.safetensors").symlink_to(Path("../../blobs/abc123"))
    assert check_model_dir(snapshot) == snapshot


@pytest.mark.parametrize("shard, words", [
    ("../outside.safetensors", "not a file beside it"),
    ("/etc/passwd", "not a file beside it"),
    ("sub/model.safetensors", "not a file beside it"),
    ("missing-00002.safetensors", "missing"),
])
def test_a_shard_index_naming_files_elsewhere_is_refused(tmp_path, shard, words):
    (tmp_path / "outside.safetensors").write_bytes(b"\0")
    path = model_dir(tmp_path / "m", weights=("model-00001.safetensors",))
    index = {"metadata": {}, "weight_map": {"a.weight": "model-00001.safetensors", "b.weight": shard}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match=words):
        check_model_dir(path)


@pytest.mark.parametrize("where", ["config.json", "tokenizer_config.json"])
def test_model_code_needs_trust_remote_code(tmp_path, where):
    auto_map = {"auto_map": {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
                             "AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}
    path = model_dir(tmp_path / "m", config={**CONFIG, **auto_map} if where == "config.json" else None)
    if where == "tokenizer_config.json":
        (path / where).write_text(json.dumps(auto_map))
    (path / "modeling_evil.py").write_text("raise SystemExit('ran code')\n")
    with pytest.raises(UserError, match=f"\\({where} auto_map\\).*--trust-remote-code"):
        check_model_dir(path)
    assert check_model_dir(path, RunOptions(trust_remote_code=True)) == path


@pytest.mark.parametrize("revision", [None, "main", "v1.0", "abc123"])
def test_trust_remote_code_on_a_hub_id_needs_a_pinned_commit(revision):
    from ollama_compress.hooks.source import resolve_source

    with pytest.raises(UserError, match="pinned revision"):
        resolve_source("some-org/some-model", RunOptions(trust_remote_code=True), revision)


def test_a_pinned_commit_passes_the_trust_check():
    from ollama_compress.hooks.source import resolve_source

    # past the trust check, the offline look-up of a model nobody has cached fails
    with pytest.raises(UserError, match="not in the local HF cache"):
        resolve_source("some-org/some-model", RunOptions(trust_remote_code=True), "0123456789abcdef" * 2 + "01234567")


# ---------------------------------------------------------------- the code itself
def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            yield node


def _keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_pickle_loads_in_the_code(path):
    """torch.load only with weights_only=True; model weights only through safetensors or GGUF."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for call in _calls(tree):
        where = f"{path.relative_to(ROOT)}:{call.lineno}"
        if call.func.attr == "load" and isinstance(call.func.value, ast.Name) and call.func.value.id == "torch":
            value = _keyword(call, "weights_only")
            assert isinstance(value, ast.Constant) and value.value is True, f"{where}: torch.load without weights_only=True"
        if call.func.attr in ("loads", "load") and isinstance(call.func.value, ast.Name) \
                and call.func.value.id in ("pickle", "dill", "joblib", "cloudpickle"):
            pytest.fail(f"{where}: {call.func.value.id}.{call.func.attr} runs code from the file")
        receiver = ast.unparse(call.func.value)
        if call.func.attr == "from_pretrained" and "Model" in receiver and "Config" not in receiver:
            keys = {k.arg for k in call.keywords}
            assert keys & {"use_safetensors", "gguf_file"}, \
                f"{where}: {receiver}.from_pretrained may load pickle weights; pass use_safetensors or load through modelio.load_model"
    assert "weights_only=False" not in path.read_text(encoding="utf-8")


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_pickle_weights_with_code_never_run_it_even_with_allow_pickle(tmp_path):
    import pickle

    from ollama_compress.modelio import load_model

    marker = tmp_path / "ran"
    config = {**CONFIG, "hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2,
              "num_key_value_heads": 2, "num_hidden_layers": 1, "vocab_size": 32, "max_position_embeddings": 16}
    path = model_dir(tmp_path / "m", weights=(), config=config)
    (path / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": _Payload(marker)}))
    with pytest.raises(UserError, match="cannot load these weights") as info:
        load_model(path, RunOptions(allow_pickle=True))
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_a_gguf_file_named_inside_a_model_directory_stays_inside(tmp_path):
    from ollama_compress.modelio import file_in_model_dir

    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc").write_bytes(b"GGUF")
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "m.gguf").symlink_to(Path("../../blobs/abc"))
    assert file_in_model_dir(snapshot, "m.gguf", "source.gguf_file") == snapshot / "m.gguf"
    (tmp_path / "secret.gguf").write_bytes(b"GGUF")
    (snapshot / "out.gguf").symlink_to(tmp_path / "secret.gguf")
    for bad in ("out.gguf", "../../../secret.gguf", "/etc/passwd", "a\0b"):
        with pytest.raises(UserError):
            file_in_model_dir(snapshot, bad, "source.gguf_file")
