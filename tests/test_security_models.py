"""Model directories and weights: safetensors only by default, no pickle loads, remote code only
from the command line with a pinned revision, nothing read from outside the model directory."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from ollama_compress.options import RunOptions
from ollama_compress.errors import UserError
from ollama_compress.modelio import check_model_dir

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "plugin").rglob("*.py")) + sorted((ROOT / "hooks").rglob("*.py"))
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
EMPTY_SAFETENSORS = (2).to_bytes(8, "little") + b"{}"  # a valid safetensors file holding no tensor


def model_dir(root: Path, weights=("model.safetensors",), config=None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config or CONFIG))
    for name in weights:
        (root / name).write_bytes(EMPTY_SAFETENSORS if name.endswith(".safetensors") else b"\0" * 16)
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
    blob.write_bytes(EMPTY_SAFETENSORS)
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


# ---------------------------------------------------------------- weights that are the model their config says
def _copy_model(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("change, words", [
    ({"num_hidden_layers": 4}, "describes .* weight\\(s\\) the files lack"),
    ({"hidden_size": 128}, "has shape .* but config.json describes"),
    ({"intermediate_size": 96}, "has shape .* but config.json describes"),
])
def test_a_config_that_disagrees_with_the_weights_is_refused_by_every_loader(tiny_model_dir, tmp_path, change, words):
    from ollama_compress.gguf import check_exportable
    from ollama_compress.modelio import check_causal_lm, load_model

    path = _copy_model(tiny_model_dir("llama", 2), tmp_path / "m")
    _edit_config(path, **change)
    for load in (check_causal_lm, load_model, check_exportable):
        with pytest.raises(UserError, match=words) as info:
            load(path)
        assert "\n" not in str(info.value)


def test_weights_that_match_their_config_load_for_every_architecture(tiny_model_dir, arch):
    from ollama_compress.modelio import check_causal_lm

    check_causal_lm(tiny_model_dir(arch, 2))


def _safetensors(path: Path, header, data: bytes = b"\0" * 16) -> Path:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


GOOD_ENTRY = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


@pytest.mark.parametrize("header", [
    [1, 2],
    {"w": 5},
    {"w": {**GOOD_ENTRY, "dtype": 5}},
    {"w": {**GOOD_ENTRY, "dtype": "F99"}},
    {"w": {**GOOD_ENTRY, "shape": "2x2"}},
    {"w": {**GOOD_ENTRY, "shape": [2, -1]}},
    {"w": {**GOOD_ENTRY, "shape": [True, 2]}},
    {"w": {**GOOD_ENTRY, "data_offsets": [0, 1 << 40]}},
    {"w": {**GOOD_ENTRY, "data_offsets": [8, 4]}},
    {"w": {**GOOD_ENTRY, "data_offsets": "0-16"}},
    {"__metadata__": {"format": 1}, "w": GOOD_ENTRY},
    b"\xff\xfe not utf-8",
    b"{" * 10000,
])
def test_safetensors_headers_of_the_wrong_types_are_one_line(tmp_path, header):
    from ollama_compress.modelio import safetensors_shapes

    path = _safetensors(tmp_path / "model.safetensors", header)
    with pytest.raises(UserError) as info:
        safetensors_shapes(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_a_good_safetensors_header_reads(tmp_path):
    from ollama_compress.modelio import safetensors_shapes

    path = _safetensors(tmp_path / "model.safetensors", {"__metadata__": {"format": "pt"}, "w": GOOD_ENTRY})
    assert safetensors_shapes(path) == {"w": (2, 2)}


def test_a_config_that_is_not_an_object_is_one_line(tmp_path):
    from ollama_compress.modelio import read_config

    for text in ("[1, 2]", "null", '"llama"', "[" * 100000):
        (tmp_path / "config.json").write_text(text)
        with pytest.raises(UserError, match="config.json") as info:
            read_config(tmp_path)
        assert "\n" not in str(info.value)


# ---------------------------------------------------------------- never write a broken model
def _poison(path: Path, name: str = "model.layers.1.mlp.down_proj.weight", value: float = float("nan")) -> str:
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    tensors[name][0, 0] = value
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return name


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_export_refuses_non_finite_weights_and_writes_nothing(tiny_model_dir, tmp_path, value):
    from ollama_compress.gguf import write_gguf

    path = _copy_model(tiny_model_dir("llama", 2), tmp_path / "m")
    name = _poison(path, value=value)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UserError, match=f"tensor {name} holds NaN or Inf"):
        write_gguf(path, out / "m.gguf", "F16")
    assert list(out.iterdir()) == []


def test_prune_refuses_non_finite_weights_and_writes_nothing(tiny_model_dir, tmp_path):
    from ollama_compress.hooks.prune import prune_dir

    path = _copy_model(tiny_model_dir("llama", 4), tmp_path / "m")
    name = _poison(path)
    with pytest.raises(UserError, match="model.layers.*holds NaN or Inf"):
        prune_dir(path, tmp_path / "out", [2])
    assert not (tmp_path / "out").exists()
    assert name.startswith("model.layers.1.")


def test_saving_a_model_with_non_finite_weights_is_refused(tmp_path):
    import torch

    from ollama_compress.modelio import check_finite, save_model
    from tiny_models import tiny_model

    model = tiny_model("llama", 2)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[3, 3] = float("inf")
    with pytest.raises(UserError, match="model.layers.1.self_attn.o_proj.weight holds NaN or Inf"):
        save_model(model, None, tmp_path)
    assert list(tmp_path.iterdir()) == []
    big = torch.zeros(3 * (1 << 24) + 5)
    check_finite([("big", big)], "x")
    big[-1] = float("nan")  # past the first chunks
    with pytest.raises(UserError, match="big holds NaN"):
        check_finite([("big", big)], "x")


def test_heal_refuses_to_save_weights_that_diverged(tmp_path):
    import torch

    from ollama_compress.errors import StageFailed
    from ollama_compress.hooks.heal import _save
    from tiny_models import tiny_model

    model = tiny_model("llama", 2)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    student_dir = tmp_path / "student"
    student_dir.mkdir()
    with pytest.raises(StageFailed, match="healed model: tensor .* holds NaN or Inf"):
        _save(model, None, student_dir, tmp_path / "out", [], {})
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- GGUFs llama.cpp can load
def _gguf(path: Path, block_count: int = 2, skip: tuple = (), **keys) -> Path:
    from gguf_samples import write_llama_gguf

    return write_llama_gguf(path, block_count, skip, **keys)


@pytest.mark.parametrize("skip, keys, words", [
    (("attn_q",), {}, "needs tensors this file lacks: blk.1.attn_q.weight"),
    (("ffn_down", "ffn_norm"), {}, "blk.1.ffn_norm.weight, blk.1.ffn_down.weight"),
    ((), {"attention__head_count": 0}, "llama.attention.head_count is 0"),
    ((), {"embedding_length": 0}, "llama.embedding_length is 0"),
    ((), {"context_length": 0}, "llama.context_length is 0"),
])
def test_verify_refuses_what_llama_cpp_cannot_load(tmp_path, skip, keys, words):
    from ollama_compress.gguf_verify import verify_gguf

    path = _gguf(tmp_path / "m.gguf", skip=skip, **keys)
    with pytest.raises(UserError, match=words):
        verify_gguf(path)
    assert verify_gguf(_gguf(tmp_path / "ok.gguf", attention__head_count=4)).tensor_count == 20


def test_verify_and_the_writer_share_the_metadata_rule():
    from gguf import GGUFValueType

    from ollama_compress.gguf.arch import metadata_type_problem

    assert metadata_type_problem("general.tags", {GGUFValueType.ARRAY}) is not None
    assert metadata_type_problem("general.tags", {GGUFValueType.STRING, GGUFValueType.INT64}) is not None
    assert metadata_type_problem("general.tags", {GGUFValueType.STRING}) is None


@pytest.mark.parametrize("card, words", [
    ("---\ntags: [[a, b], c]\n---\n# card\n", "general.tags' is an array of arrays"),
    ("---\ntags: [a, 1]\n---\n", "general.tags' is an array of mixed types"),
    ("---\nlicense: !!python/object/apply:os.system ['touch x']\n---\n", "model card"),
    ("---\ntags: [a\n---\n", "model card"),
])
def test_export_refuses_model_card_values_llama_cpp_cannot_read(tiny_model_dir, tmp_path, card, words):
    from ollama_compress.gguf import write_gguf

    path = _copy_model(tiny_model_dir("llama", 2), tmp_path / "m")
    (path / "README.md").write_text(card)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UserError, match=words) as info:
        write_gguf(path, out / "m.gguf", "F16")
    assert "\n" not in str(info.value)
    assert list(out.iterdir()) == [] and not (tmp_path / "x").exists()


def test_a_gguf_the_writer_makes_passes_the_same_loadability_check(tiny_model_dir, arch, tmp_path):
    from ollama_compress.gguf import write_gguf
    from ollama_compress.gguf_verify import verify_gguf

    summary = verify_gguf(write_gguf(tiny_model_dir(arch, 2), tmp_path / "m.gguf", "F16").path)
    assert summary.block_count == 2


def test_import_refuses_a_gguf_with_non_finite_weights(tmp_path, smollm2_gguf):
    import numpy as np

    from gguf_samples import write_tiny_llama_gguf
    from ollama_compress.gguf_verify import verify_gguf
    from ollama_compress.hooks.source import import_gguf

    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf", smollm2_gguf, dtype=np.float32)
    summary = verify_gguf(path)
    norm = next(t for t in summary.tensors if t.name == "blk.1.ffn_norm.weight")
    with open(path, "r+b") as f:
        f.seek(summary.data_offset + norm.offset + 4)
        f.write(np.array([np.inf], np.float32).tobytes())
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UserError, match="post_attention_layernorm.weight holds NaN or Inf"):
        import_gguf(path, out)
    assert list(out.iterdir()) == []
