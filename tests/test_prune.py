"""Layer selection and depth-pruning surgery (ollama_compress.hooks.prune).

Surgery is checked against an independent reference: a fresh model built from a config with fewer
layers, whose layer i gets the weights of the i-th kept teacher layer by index. Logits must be
bit-identical, with and without the KV cache.
"""
from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from helpers import recipe_dict
from ollama_compress.context import StageContext
from ollama_compress.errors import UserError
from ollama_compress.hooks import prune
from tiny_models import tiny_config, tiny_model

LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


# ---------------------------------------------------------------- helpers
def _ids(length: int = 24, seed: int = 0) -> torch.Tensor:
    """Token ids longer than the tiny gemma sliding window (16), so local and global attention differ."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 5000, (2, length), generator=gen)


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _generate(model, ids: torch.Tensor):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                              min_new_tokens=5, do_sample=False, use_cache=True, output_logits=True,
                              return_dict_in_generate=True, pad_token_id=0)


def _reference(teacher, arch: str, kept: list[int], layer_types: list[str] | None | str = "teacher"):
    """A model built directly with ``len(kept)`` layers holding the kept teacher layers' weights.

    ``layer_types="teacher"``: each layer keeps its teacher layer's attention type (what prune
    writes); ``None``: the config class's default pattern for the new depth.
    """
    from transformers import AutoModelForCausalLM

    overrides = {}
    if layer_types == "teacher" and getattr(teacher.config, "layer_types", None) is not None:
        overrides["layer_types"] = [teacher.config.layer_types[i] for i in kept]
    elif isinstance(layer_types, list):
        overrides["layer_types"] = layer_types
    config = tiny_config(arch, len(kept), **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    source = teacher.state_dict()
    state = {}
    for key in model.state_dict():
        m = LAYER_KEY.match(key)
        state[key] = source[f"model.layers.{kept[int(m.group(1))]}.{m.group(2)}" if m else key]
    model.load_state_dict(state, strict=True)
    return model.eval()


def _assert_same_outputs(model, reference, ids: torch.Tensor) -> None:
    assert torch.equal(_logits(model, ids), _logits(reference, ids))
    got, want = _generate(model, ids), _generate(reference, ids)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits, strict=True):
        assert torch.equal(a, b)


def _run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    from ollama_compress import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


# ---------------------------------------------------------------- selection
def test_lowest_scores_removed_first_and_protected_layers_stay():
    scores = [0.1, 0.9, 0.2, 0.8, 0.3, 0.05]
    assert prune.select_layers(scores, 6, remove=2) == [2, 4]  # 0 and 5 score lower but are protected
    assert prune.select_layers(scores, 6, remove=2, protect=[]) == [0, 5]
    assert prune.select_layers(scores, 6, keep=4, protect=["first", 2]) == [4, 5]
    assert prune.select_layers(scores, 6, remove=0) == []
    assert prune.select_layers([], 6, layers=[4, 1]) == [1, 4]


def test_block_removes_the_contiguous_run_with_the_lowest_total():
    scores = [0.1, 0.5, 0.4, 0.45, 0.2, 0.1, 0.9]
    assert prune.select_layers(scores, 7, remove=2, block=True) == [4, 5]
    assert prune.select_layers(scores, 7, remove=2, block=True, protect=["first", "last", 5]) == [3, 4]
    # per-start block scores (angular distance across the block) choose the start when given
    assert prune.select_layers(scores, 7, remove=3, block=True, block_scores=[0.0, 0.5, 0.1, 0.2, 0.3]) == [2, 3, 4]
    assert prune.select_layers(scores, 7, remove=2, block=True, block_start=1) == [1, 2]


def test_describe_selection_shows_mergekit_slices():
    text = prune.describe_selection([12, 13, 14], 30)
    assert "kept: [0, 12) + [15, 30) (mergekit slices: layer_range [0, 12], [15, 30])" in text
    assert prune.kept_slices([0, 3, 4], 6) == [(1, 3), (5, 6)]


@pytest.mark.parametrize("kwargs, words", [
    (dict(remove=6), "leaves none"),
    (dict(remove=7), "leaves none"),
    (dict(layers=[0, 3]), "layer 0 is protected"),
    (dict(layers=[5, 3]), "layer 5 is protected"),
    (dict(layers=[6]), "out of range"),
    (dict(layers=[-1]), "out of range"),
    (dict(layers=[2, 2]), "more than once"),
    (dict(layers=[0, 1, 2, 3, 4, 5], protect=[]), "leaves none"),
    (dict(keep=1), "only 4 are not protected"),
    (dict(remove=5), "only 4 are not protected"),
    (dict(keep=7), "has only 6"),
    (dict(keep=0), "at least 1"),
    (dict(remove=-1), "0 or more"),
    (dict(remove=2, keep=3), "exactly one"),
    (dict(), "exactly one"),
    (dict(layers=[2], block=True), "block"),
    (dict(remove=4, block=True, protect=[2]), "no run of 4"),
    (dict(remove=2, block=True, block_start=4), "protected layer 5"),
    (dict(remove=1, protect=[9]), "out of range"),
    (dict(remove=1, protect=["middle"]), "protect"),
])
def test_bad_selection_is_a_one_line_user_error(kwargs, words):
    with pytest.raises(UserError) as err:
        prune.select_layers([0.5] * 6, 6, **kwargs)
    assert words in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- surgery on files
def test_nothing_removed_keeps_logits_exactly(arch, tiny_model_dir, tmp_path):
    source = tiny_model_dir(arch)
    out = prune.prune_dir(source, tmp_path / "pruned", [])
    ids = _ids()
    assert torch.equal(_logits(_load(out), ids), _logits(_load(source), ids))


def test_removed_layers_match_a_model_built_with_the_kept_layers(arch, tiny_model_dir, tmp_path):
    source = tiny_model_dir(arch)
    remove, kept = [1, 4], [0, 2, 3, 5]
    out = prune.prune_dir(source, tmp_path / "pruned", remove, metric="test", scores={"test": [0.0] * 6})
    teacher, pruned = _load(source), _load(out)
    assert pruned.config.num_hidden_layers == 4 and len(pruned.model.layers) == 4
    teacher_types = getattr(teacher.config, "layer_types", None)
    if teacher_types is not None:
        assert pruned.config.layer_types == [teacher_types[i] for i in kept]
    _assert_same_outputs(pruned, _reference(teacher, arch, kept), _ids())


@pytest.mark.parametrize("arch_name", ["gemma2", "gemma3"])
def test_gemma_layers_keep_their_teachers_attention_type(arch_name, tiny_model_dir, tmp_path):
    """Removing layer 1 shifts the local/global pattern; the pruned model must not follow the shift."""
    source = tiny_model_dir(arch_name)
    kept = [0, 2, 3, 5]
    pruned = _load(prune.prune_dir(source, tmp_path / "pruned", [1, 4]))
    teacher = _load(source)
    default = tiny_config(arch_name, 4).layer_types
    assert pruned.config.layer_types != default  # the pattern really does shift here
    shifted = _reference(teacher, arch_name, kept, layer_types=default)
    assert not torch.equal(_logits(pruned, _ids()), _logits(shifted, _ids()))
    written = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert written["layer_types"] == [teacher.config.layer_types[i] for i in kept]
    # llama.cpp fixes the pattern by index (period 2 for gemma2, 6 for gemma3): the layer map says so
    assert json.loads((tmp_path / "pruned" / "layer_map.json").read_text())["gguf_attention_pattern_matches"] is False
    if arch_name == "gemma2":  # removing a local+global pair keeps every later layer's type in a GGUF too
        pair = prune.prune_dir(source, tmp_path / "pair", [1, 2])
        assert json.loads((pair / "layer_map.json").read_text())["gguf_attention_pattern_matches"] is True


def test_sharded_checkpoint_is_rewritten_shard_by_shard(tmp_path, smollm2_tokenizer):
    teacher = tiny_model("llama", 6)
    source = tmp_path / "sharded"
    teacher.save_pretrained(source, max_shard_size="300KB")
    smollm2_tokenizer.save_pretrained(source)
    assert (source / prune.INDEX_FILE).is_file()
    out = prune.prune_dir(source, tmp_path / "pruned", [1, 2, 4])
    index = json.loads((out / prune.INDEX_FILE).read_text())
    from safetensors import safe_open

    total, names = 0, set()
    for file in set(index["weight_map"].values()):
        with safe_open(str(out / file), framework="pt") as f:
            for key in f.keys():
                assert index["weight_map"][key] == file
                total += f.get_tensor(key).numel() * 4
                names.add(key)
    assert names == set(index["weight_map"]) and index["metadata"]["total_size"] == total
    assert {int(m.group(1)) for k in names if (m := LAYER_KEY.match(k))} == {0, 1, 2}
    _assert_same_outputs(_load(out), _reference(teacher, "llama", [0, 3, 5]), _ids())


def test_gemma3_config_with_only_the_pattern_gets_explicit_layer_types(tiny_model_dir, tmp_path):
    """Hub gemma3 configs often carry ``sliding_window_pattern`` and no ``layer_types``."""
    source = tmp_path / "pattern-only"
    shutil.copytree(tiny_model_dir("gemma3"), source)
    config = json.loads((source / "config.json").read_text())
    teacher_types = config.pop("layer_types")
    (source / "config.json").write_text(json.dumps(config))
    out = prune.prune_dir(source, tmp_path / "pruned", [1, 4])
    assert json.loads((out / "config.json").read_text())["layer_types"] == [teacher_types[i] for i in (0, 2, 3, 5)]
    _assert_same_outputs(_load(out), _reference(_load(source), "gemma3", [0, 2, 3, 5]), _ids())


def test_qwen2_sliding_layers_stay_sliding(tmp_path, smollm2_tokenizer):
    """With sliding windows on, qwen2 layers from ``max_window_layers`` up slide; the count must move."""
    window = dict(use_sliding_window=True, sliding_window=16, max_window_layers=3)
    teacher = tiny_model("qwen2", 6, **window)
    source = tmp_path / "qwen2-swa"
    teacher.save_pretrained(source)
    smollm2_tokenizer.save_pretrained(source)
    out = prune.prune_dir(source, tmp_path / "pruned", [1, 4])  # kept 0, 2 | 3, 5: two below the threshold
    config = json.loads((out / "config.json").read_text())
    assert config["max_window_layers"] == 2
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_config(tiny_config("qwen2", 4, **{**window, "max_window_layers": 2}))
    reference.load_state_dict(_reference(teacher, "qwen2", [0, 2, 3, 5]).state_dict())
    assert reference.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    _assert_same_outputs(_load(out), reference.eval(), _ids())


def test_pickle_weights_need_allow_pickle_and_come_out_as_safetensors(tmp_path, capsys):
    teacher = tiny_model("llama", 6)
    source = tmp_path / "pickled"
    teacher.save_pretrained(source)
    (source / "model.safetensors").unlink()
    torch.save(teacher.state_dict(), source / "pytorch_model.bin")
    out = tmp_path / "pruned"
    code, _, stderr = _run_cli(["prune", source, "--layers", "3", "--out", out], capsys)
    assert code == 2 and "--allow-pickle" in stderr and not out.exists()
    code, _, stderr = _run_cli(["prune", source, "--layers", "3", "--out", out, "--allow-pickle", "--repair", "none"],
                               capsys)
    assert code == 0, stderr
    assert (out / "model.safetensors").is_file() and not (out / "pytorch_model.bin").exists()
    _assert_same_outputs(_load(out), _reference(teacher, "llama", [0, 1, 2, 4, 5]), _ids())


# ---------------------------------------------------------------- surgery in memory
def test_prune_model_in_memory_renumbers_layers_for_the_cache(arch):
    teacher = tiny_model(arch, 6)
    kept = [0, 2, 3, 5]
    pruned = prune.prune_model(copy.deepcopy(teacher), [1, 4])
    for index, layer in enumerate(pruned.model.layers):
        assert layer.self_attn.layer_idx == index
    assert pruned.config.num_hidden_layers == 4
    _assert_same_outputs(pruned, _reference(teacher, arch, kept), _ids())


# ---------------------------------------------------------------- command line and layer_map.json
def test_cli_layers_writes_model_and_layer_map(tiny_model_dir, tmp_path, capsys):
    source = tiny_model_dir("qwen2")
    out = tmp_path / "pruned"
    code, stdout, _ = _run_cli(["prune", source, "--layers", "2,3", "--out", out], capsys)
    assert code == 0
    assert "mergekit slices: layer_range [0, 2], [4, 6]" in stdout
    layer_map = json.loads((out / "layer_map.json").read_text())
    assert layer_map["student_to_teacher"] == [0, 1, 4, 5]
    assert layer_map["removed"] == [2, 3]
    assert (layer_map["num_layers_before"], layer_map["num_layers_after"]) == (6, 4)
    assert layer_map["architecture"] == "qwen2" and layer_map["metric"] is None
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 4 and len(config["layer_types"]) == 4
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "model.safetensors"):
        assert (out / name).is_file(), name
    assert not list(tmp_path.glob(".*tmp*"))


def test_cli_scores_then_removes_the_lowest(tiny_model_dir, tmp_path, capsys, calibration_file):
    source = tiny_model_dir("llama")
    out = tmp_path / "pruned"
    code, stdout, _ = _run_cli(["prune", source, "--remove", "2", "--calibration", calibration_file, "--select",
                                "metric", "--samples", "4", "--seq-len", "32", "--out", out, "--json"], capsys)
    assert code == 0
    result = json.loads(stdout)
    scores = result["scores"]["block_influence"]
    assert len(scores) == 6 and result["metric"] == "block_influence"
    middle = sorted(range(1, 5), key=lambda i: scores[i])
    assert result["removed"] == sorted(middle[:2])
    assert json.loads((out / "layer_map.json").read_text())["removed"] == result["removed"]


def test_cli_angular_block_takes_the_closest_unprotected_block(tiny_model_dir, tmp_path, capsys, calibration_file):
    source = tiny_model_dir("mistral")
    code, stdout, _ = _run_cli(["prune", source, "--remove", "3", "--block", "--metric", "angular", "--select", "metric",
                                "--calibration", calibration_file, "--samples", "4", "--seq-len", "32",
                                "--out", tmp_path / "pruned", "--json"], capsys)
    assert code == 0
    result = json.loads(stdout)
    distances = result["block_scores"]
    assert len(distances) == 4  # starts 0..3 for a block of 3 in 6 layers
    best = min((1, 2), key=lambda s: distances[s])  # starts whose block avoids layers 0 and 5
    assert result["removed"] == [best, best + 1, best + 2]


def _iterative(repair: str = "none"):
    from ollama_compress.recipe import Prune

    return Prune(remove=2, iterative=True, metric="block_influence", repair=repair)


def test_iterative_rescores_after_each_removal(tiny_model_dir, tmp_path, calibration_file):
    from ollama_compress.recipe import TextSource

    source = tiny_model_dir("qwen3")
    spec = TextSource.model_validate({"from": "text", "path": str(calibration_file), "samples": 2, "seq_len": 16})
    batches_fn = prune._batches_fn(source, spec, prune.RunOptions(), None)
    calls = []
    out = prune.prune_iteratively(source, tmp_path / "healed", _iterative(), batches_fn,
                                  between_steps=lambda model, step, kept: calls.append((step, kept)))
    layer_map = json.loads((out / "layer_map.json").read_text())
    steps = layer_map["steps"]
    assert [len(s["scores"]) for s in steps] == [6, 5]
    teacher_of = list(range(6))
    for step in steps:  # each step removed the lowest unprotected layer of the model as it was then
        current = step["scores"]
        lowest = min(range(1, len(current) - 1), key=lambda i: current[i])
        assert step["removed_student_index"] == lowest and step["removed"] == teacher_of.pop(lowest)
    assert layer_map["student_to_teacher"] == teacher_of and [c[0] for c in calls] == [0, 1]
    assert calls[-1][1] == teacher_of
    # without a step in between, the result is cut from the original weights: the same model
    exact = prune.prune_iteratively(source, tmp_path / "exact", _iterative(), batches_fn)
    assert json.loads((exact / "layer_map.json").read_text())["removed"] == layer_map["removed"]
    ids = _ids()
    assert torch.equal(_logits(_load(out), ids), _logits(_load(exact), ids))
    _assert_same_outputs(_load(exact), _reference(_load(source), "qwen3", teacher_of), ids)


def test_stage_hook_prunes_with_the_recipe_settings(tiny_model_dir, tmp_path):
    from ollama_compress.recipe import validate

    source = tiny_model_dir("phi3")
    recipe = validate(recipe_dict(source, "t", prune={"metric": "block_influence", "keep": 4, "protect": ["first"],
                                                      "select": "metric"}))
    ctx = StageContext(stage="prune", recipe=recipe, run_dir=tmp_path, out_dir=tmp_path / "20-prune")
    ctx.out_dir.mkdir()
    scores = {"block_influence": [0.9, 0.3, 0.8, 0.7, 0.2, 0.1]}
    out = prune.prune_layers(ctx=ctx, model_dir=source, scores=scores)
    assert out == ctx.out_dir / "model"
    layer_map = json.loads((out / "layer_map.json").read_text())
    assert layer_map["removed"] == [4, 5] and layer_map["scores"] == scores
    assert ctx.metrics["removed_layers"] == [4, 5] and "mergekit" in ctx.metrics["prune_description"]


# ---------------------------------------------------------------- bad input: exit 2, nothing written
@pytest.mark.parametrize("args", [
    ["--remove", "6"],
    ["--keep", "1"],
    ["--keep", "0"],
    ["--layers", "0,2"],
    ["--layers", "9"],
    ["--layers", "2,2"],
    ["--layers", "2,x"],
    ["--layers", "1", "--protect", "banana"],
    ["--remove", "2", "--keep", "3"],
    [],
    ["--remove", "2", "--metric", "no_such_metric"],
    ["--remove", "2", "--iterative", "--block"],
    ["--remove", "2", "--calibration", "EMPTY"],
    ["--remove", "2", "--calibration", "MISSING"],
])
def test_cli_bad_input_exits_2_and_writes_nothing(args, tiny_model_dir, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("  \n")
    args = [{"EMPTY": tmp_path / "empty.txt", "MISSING": tmp_path / "missing.txt"}.get(a, a) for a in args]
    out = tmp_path / "pruned"
    code, _, stderr = _run_cli(["prune", tiny_model_dir("llama"), *args, "--out", out], capsys)
    assert code == 2, stderr
    assert stderr.splitlines()[-1].startswith("Error: ")  # one line (library log noise may precede it)
    assert "Traceback" not in stderr.split("Error: ")[-1]
    assert not out.exists()


def test_no_count_names_the_flags_the_command_has(tiny_model_dir, tmp_path, capsys):
    code, _, stderr = _run_cli(["prune", tiny_model_dir("llama"), "--out", tmp_path / "out"], capsys)
    assert code == 2
    assert "--remove N, --keep N or --layers" in stderr and "target" not in stderr


def test_unsupported_architecture_exits_2(tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gpt2", n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "gpt2")
    code, _, stderr = _run_cli(["prune", tmp_path / "gpt2", "--layers", "1", "--protect", "none",
                                "--out", tmp_path / "out"], capsys)
    assert code == 2 and "GPT2LMHeadModel is not supported yet by prune" in stderr
    assert not (tmp_path / "out").exists()


def test_layers_not_where_the_architecture_says_exits_2(tiny_model_dir, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    source = tiny_model_dir("llama")
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text((source / "config.json").read_text())
    with safe_open(str(source / "model.safetensors"), framework="pt") as f:
        tensors = {k.replace("model.layers.", "transformer.h."): f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(odd / "model.safetensors"), metadata={"format": "pt"})
    code, _, stderr = _run_cli(["prune", odd, "--layers", "2", "--out", tmp_path / "out"], capsys)
    assert code == 2 and "model.layers.N" in stderr
    assert not (tmp_path / "out").exists()


def test_out_must_not_be_the_model_or_a_foreign_directory(tiny_model_dir, tmp_path, capsys):
    source = tiny_model_dir("llama")
    code, _, stderr = _run_cli(["prune", source, "--layers", "2", "--out", source], capsys)
    assert code == 2 and "overlaps" in stderr
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    code, _, stderr = _run_cli(["prune", source, "--layers", "2", "--out", foreign], capsys)
    assert code == 2 and (foreign / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------- the real model
@pytest.mark.slow
def test_pruned_smollm2_loads_and_generates(smollm2_hf, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "smollm2-24"
    code, stdout, stderr = _run_cli(["prune", smollm2_hf, "--remove", "6", "--samples", "4", "--seq-len", "64",
                                     "--out", out], capsys)
    assert code == 0, stderr
    assert "30 -> 24 layers" in stdout
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert model.config.num_hidden_layers == 24 and len(model.model.layers) == 24
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Name a colour."}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=12, min_new_tokens=4, do_sample=False)
    text = tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)
    assert text.strip()


def test_iterative_prune_heals_through_the_heal_hook_so_a_plugin_takes_over(tiny_model_dir, tmp_path,
                                                                            calibration_file):
    from ollama_compress import modelio, plugins
    from ollama_compress.hookspecs import hookimpl
    from ollama_compress.recipe import validate

    calls: list[tuple[int, list[int]]] = []

    class TakeOverHeal:
        @hookimpl(tryfirst=True)
        def heal(self, ctx, student_dir, teacher_dir):
            mapping = json.loads((Path(student_dir) / "layer_map.json").read_text())["student_to_teacher"]
            calls.append((ctx.inputs["iterative_step"], mapping))
            model = modelio.load_model(student_dir)
            with torch.no_grad():
                model.model.norm.weight.fill_(0.5)
            out = Path(ctx.out_dir) / "model"
            out.mkdir()
            return modelio.save_model(model, None, out, student_dir)

    source = tiny_model_dir("llama")
    recipe = validate(recipe_dict(source, "t", heal={"iterative_steps": 2},
                                  data={"calibration": {"from": "text", "path": str(calibration_file), "samples": 2,
                                                        "seq_len": 16}},
                                  prune={"remove": 2, "iterative": True, "select": "metric"}))
    ctx = StageContext(stage="prune", recipe=recipe, run_dir=tmp_path, out_dir=tmp_path / "20-prune")
    ctx.out_dir.mkdir()
    try:
        plugins.register_plugin(TakeOverHeal(), name="take-over-heal")
        out = prune.prune_layers(ctx=ctx, model_dir=source, scores={})
    finally:
        plugins.reset()
    layer_map = json.loads((out / "layer_map.json").read_text())
    assert [c[0] for c in calls] == [1, 2]
    assert len(calls[0][1]) == 5 and calls[1][1] == layer_map["student_to_teacher"]
    assert torch.all(_load(out).model.norm.weight == 0.5)  # the plugin's weights, loaded back between steps
    assert sorted(p.name for p in ctx.out_dir.iterdir()) == ["model"]


def test_iterative_without_a_heal_repairs_the_final_cut_from_the_original_weights(tiny_model_dir, tmp_path,
                                                                                  calibration_file):
    from ollama_compress.recipe import TextSource

    source = tiny_model_dir("llama")
    spec = TextSource.model_validate({"from": "text", "path": str(calibration_file), "samples": 2, "seq_len": 16})
    batches_fn = prune._batches_fn(source, spec, prune.RunOptions(), None)
    plain = prune.prune_iteratively(source, tmp_path / "plain", _iterative(), batches_fn)
    repaired = prune.prune_iteratively(source, tmp_path / "repaired", _iterative(repair="linear"), batches_fn)
    layer_map = json.loads((repaired / "layer_map.json").read_text())
    assert layer_map["repair"]["method"] == "linear" and layer_map["repair"]["spans"]
    anchors = {s["anchor"] for s in layer_map["repair"]["spans"] if s["anchor"] is not None}
    student = {t: s for s, t in enumerate(layer_map["student_to_teacher"])}
    a, b = _load(plain), _load(repaired)
    for teacher_layer, s in student.items():
        same = torch.equal(a.model.layers[s].mlp.down_proj.weight, b.model.layers[s].mlp.down_proj.weight)
        assert same == (teacher_layer not in anchors)
