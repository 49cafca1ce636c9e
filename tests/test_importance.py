"""Layer-importance metrics, the score_layers stage and the ``analyze`` command.

Metrics are checked against independent computations: HF's ``output_hidden_states`` for block
influence, and layers made exact identities (zeroed output projections) for drop_one and angular.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import recipe_dict
from ollama_compress.context import StageContext
from ollama_compress.errors import UserError
from ollama_compress.hooks import importance
from ollama_compress.recipe import validate
from tiny_models import tiny_model

METRICS = ["block_influence", "angular", "drop_one"]


def _batches(count: int = 2, length: int = 24, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 5000, (1, length), generator=gen) for _ in range(count)]


def _make_identity(layer) -> None:
    """Zero the attention and MLP output projections: the residual layer then returns its input."""
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
            if proj.bias is not None:
                proj.bias.zero_()


def _run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from ollama_compress.cli import main

    with pytest.raises(SystemExit) as done:
        main(argv)
    out, err = capsys.readouterr()
    return done.value.code, out, err


# ---------------------------------------------------------------- metrics
def test_every_metric_gives_one_finite_score_per_layer(arch):
    model = tiny_model(arch, num_layers=6)
    scores = importance.score_model(model, _batches(), METRICS)
    assert list(scores) == METRICS
    for name, values in scores.items():
        assert len(values) == 6, name
        assert all(math.isfinite(v) for v in values), (name, values)
    assert all(0.0 <= v <= 2.0 for v in scores["block_influence"])
    assert all(0.0 <= v <= 1.0 for v in scores["angular"])
    assert all(v > 0.0 for v in scores["drop_one"])  # skipping any layer changes a random model


@pytest.mark.parametrize("arch_name", ["llama", "gemma2", "phi3"])
def test_block_influence_equals_direct_computation_from_hidden_states(arch_name):
    model = tiny_model(arch_name, num_layers=5)
    batches = _batches(count=2, length=20, seed=1)
    scores = importance.block_influence(model, batches)

    # HF applies the final norm to the last hidden state; take it out to get the last layer's output.
    model.model.norm = torch.nn.Identity()
    cos_sum, tokens = torch.zeros(5, dtype=torch.float64), 0
    with torch.no_grad():
        for ids in batches:
            hidden = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
            assert len(hidden) == 6
            for layer in range(5):
                cos = torch.nn.functional.cosine_similarity(hidden[layer], hidden[layer + 1], dim=-1)
                cos_sum[layer] += cos.double().sum()
            tokens += ids.numel()
    expected = (1.0 - cos_sum / tokens).tolist()
    assert scores == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_drop_one_of_an_identity_layer_is_zero_and_the_minimum(arch):
    model = tiny_model(arch, num_layers=5)
    _make_identity(importance.get_decoder_layers(model)[2])
    scores = importance.score_model(model, _batches(count=1, length=16), METRICS)
    drop = scores["drop_one"]
    assert drop[2] == pytest.approx(0.0, abs=1e-6)
    assert min(range(5), key=drop.__getitem__) == 2
    assert all(d > 1e-4 for i, d in enumerate(drop) if i != 2), drop
    assert scores["block_influence"][2] == pytest.approx(0.0, abs=1e-5)
    assert scores["angular"][2] == pytest.approx(0.0, abs=1e-3)


@pytest.mark.parametrize("arch_name", ["llama", "gemma3"])
def test_drop_one_equals_kl_of_a_model_built_without_the_layer(arch_name):
    import copy

    model = tiny_model(arch_name, num_layers=4, seed=2)
    batches = _batches(count=1, length=20, seed=4)
    scores = importance.drop_one(model, batches)
    for index in (0, 2, 3):
        # Independent reference: a copy whose layer list really lacks layer `index`.
        smaller = copy.deepcopy(model)
        layers = importance.get_decoder_layers(smaller)
        del layers[index]
        smaller.config.num_hidden_layers = 3
        if getattr(smaller.config, "layer_types", None):
            del smaller.config.layer_types[index]
        for new_index, layer in enumerate(layers):
            layer.self_attn.layer_idx = new_index
        with torch.no_grad():
            ref = torch.log_softmax(model(input_ids=batches[0], use_cache=False).logits, -1)
            cut = torch.log_softmax(smaller(input_ids=batches[0], use_cache=False).logits, -1)
        kl = float((ref.exp() * (ref - cut)).sum(-1).mean())
        assert scores[index] == pytest.approx(kl, rel=1e-4, abs=1e-7)


def test_best_block_finds_a_planted_block_of_identity_layers():
    model = tiny_model("llama", num_layers=8, seed=3)
    layers = importance.get_decoder_layers(model)
    for index in (3, 4, 5):
        _make_identity(layers[index])
    batches = _batches(count=2, length=16)
    start, distance = importance.best_block(model, batches, 3)
    assert start == 3
    assert distance == pytest.approx(0.0, abs=1e-3)
    distances = importance.block_distances(model, batches, 3)
    assert len(distances) == 6 and all(d > 1e-2 for i, d in enumerate(distances) if i != 3)
    per_layer = importance.angular(model, batches, block_size=3)
    assert sorted(range(8), key=per_layer.__getitem__)[:3] == [3, 4, 5]


def test_shared_pass_gives_the_same_scores_as_separate_passes():
    model = tiny_model("qwen3", num_layers=4)
    batches = _batches()
    together = importance.score_model(model, batches, ["angular", "block_influence"], block_size=2)
    assert together["block_influence"] == importance.block_influence(model, batches)
    assert together["angular"] == importance.angular(model, batches, block_size=2)


def test_unknown_metric_lists_the_known_ones():
    with pytest.raises(UserError, match="known: .*angular.*block_influence.*drop_one"):
        importance.score_model(tiny_model("llama", 2), _batches(1), ["no_such_metric"])


def test_layers_not_where_the_architecture_says_is_a_user_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32))
    with pytest.raises(UserError, match="layers aren't where the architecture says"):
        importance.score_model(model, [torch.randint(0, 100, (1, 8))], ["block_influence"])


def test_block_size_out_of_range_is_a_user_error():
    with pytest.raises(UserError, match="block size"):
        importance.angular(tiny_model("llama", 3), _batches(1), block_size=3)


# ---------------------------------------------------------------- stage hook
def test_score_layers_stage_writes_scores_and_plots(tmp_path, tiny_model_dir):
    model_dir = tiny_model_dir("mistral")
    recipe = validate(recipe_dict(
        model_dir, "t", data={"calibration": {"samples": 3, "seq_len": 32}},
        prune={"metric": "drop_one", "report_metrics": ["block_influence", "angular"], "remove": 2}))
    out = tmp_path / "10-importance"
    out.mkdir()
    ctx = StageContext(stage="importance", recipe=recipe, run_dir=tmp_path, out_dir=out,
                       inputs={"model_dir": str(model_dir)})
    scores = importance.score_layers(ctx, model_dir)
    assert list(scores) == ["drop_one", "block_influence", "angular"]
    written = json.loads((out / "scores.json").read_text())
    assert written["num_layers"] == 6 and written["tokens"] == 3 * 32
    for name in scores:
        assert written[name] == scores[name]
        assert len(scores[name]) == 6
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(ctx.metrics["seconds"]) == set(scores)


# ---------------------------------------------------------------- analyze command
def _analyze_twice(argv, tmp_path, capsys) -> list[dict]:
    """Run `analyze ARGV --out tmp/run{0,1}` twice; each must succeed and print JSON."""
    runs = []
    for i in range(2):
        code, out, err = _run_cli(argv + ["--out", str(tmp_path / f"run{i}")], capsys)
        assert code == 0, err
        runs.append(json.loads(out))
    return runs


def test_analyze_json_prints_only_scores_and_repeats_exactly(tmp_path, tiny_model_dir, capsys):
    model_dir = tiny_model_dir("llama")
    argv = ["analyze", str(model_dir), "--metric", "block_influence", "--metric", "angular",
            "--samples", "3", "--seq-len", "32", "--device", "cpu", "--json"]
    runs = _analyze_twice(argv, tmp_path, capsys)  # stdout is nothing but the JSON
    for i in range(2):
        assert (tmp_path / f"run{i}" / "scores.json").is_file()
        assert (tmp_path / f"run{i}" / "angular.png").is_file()
    assert set(runs[0]) == {"block_influence", "angular"}
    for values in runs[0].values():
        assert len(values) == 6 and all(math.isfinite(v) for v in values)
    assert runs[0] == runs[1]


def test_analyze_table_and_custom_calibration(tmp_path, tiny_model_dir, capsys):
    text = tmp_path / "cal.txt"
    text.write_text("A small text about rivers, bridges and boats. " * 60)
    code, out, err = _run_cli(["analyze", str(tiny_model_dir("llama")), "--calibration", str(text),
                               "--samples", "2", "--seq-len", "16", "--out", str(tmp_path / "o")], capsys)
    assert code == 0, err
    assert "block_influence" in out and "rank" in out
    assert json.loads((tmp_path / "o" / "scores.json").read_text())["tokens"] == 32


def test_analyze_bad_inputs_exit_2_and_write_nothing(tmp_path, tiny_model_dir, capsys):
    model_dir = tiny_model_dir("llama")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    out = tmp_path / "out"
    code, _, err = _run_cli(["analyze", str(model_dir), "--metric", "nope", "--out", str(out)], capsys)
    assert code == 2 and "known:" in err and "block_influence" in err
    code, _, err = _run_cli(["analyze", str(model_dir), "--calibration", str(empty), "--out", str(out)], capsys)
    assert code == 2 and "empty" in err
    code, _, err = _run_cli(["analyze", str(tmp_path / "missing"), "--out", str(out)], capsys)
    assert code == 2 and "does not exist" in err
    not_lm = tmp_path / "encoder"
    not_lm.mkdir()
    (not_lm / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    (not_lm / "model.safetensors").write_bytes(b"")
    code, _, err = _run_cli(["analyze", str(not_lm), "--out", str(out)], capsys)
    assert code == 2 and "not a causal language model" in err
    assert "Traceback" not in err
    assert not out.exists()


def test_analyze_unknown_metric_from_a_real_process(tiny_model_dir):
    from helpers import assert_clean_error, cli

    proc = cli("analyze", tiny_model_dir("llama"), "--metric", "cosine")
    assert_clean_error(proc, "unknown importance metric 'cosine'", "drop_one")


# ---------------------------------------------------------------- the real model
@pytest.mark.slow
def test_smollm2_analyze_gives_30_finite_scores_twice(smollm2_hf, tmp_path, capsys):
    argv = ["analyze", str(smollm2_hf), "--metric", "block_influence", "--metric", "angular",
            "--samples", "4", "--seq-len", "128", "--device", "cpu", "--json"]
    runs = _analyze_twice(argv, tmp_path, capsys)
    for values in runs[0].values():
        assert len(values) == 30 and all(math.isfinite(v) for v in values)
    assert runs[0] == runs[1]
    # A trained model: the first layer rewrites the embeddings far more than a typical middle layer.
    block = runs[0]["block_influence"]
    assert block[0] > sorted(block)[15]
