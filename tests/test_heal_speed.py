"""A heal that uses the machine: dtype auto chooses by measured matmul rates (not CPU flags), the
faster losses equal the reference ones in value and gradient, only the mapped layers are captured."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ollama_compress import distill, machine, modelio, trainer
from ollama_compress.hooks import heal as heal_hooks
from ollama_compress.hooks.prune import prune_dir
from ollama_compress.recipe import Data, Heal

SHAPES = [(64, 32, 48), (64, 48, 32)]


# ---------------------------------------------------------------- dtype auto
@pytest.mark.parametrize("rates, chosen", [
    ({"bfloat16": 877.0, "float32": 205.0}, "bfloat16"),  # an AMD EPYC with bf16 (issue 14)
    ({"bfloat16": 143.0, "float32": 240.0}, "float32"),  # an Intel Xeon that reports avx512_bf16
    ({"bfloat16": 0.06, "float32": 90.0}, "float32"),  # a CPU without bf16 (AVX2 only)
    ({"bfloat16": 250.0, "float32": 240.0}, "float32"),  # a tie: fp32 is exact and has no casts
])
def test_the_faster_measured_dtype_is_chosen(rates, chosen):
    assert machine.faster_dtype(rates) == chosen


def test_auto_on_a_cpu_decides_by_the_measurement_and_records_it():
    def measured(rates):
        return lambda dtype, shapes: rates[str(dtype).removeprefix("torch.")]

    fast_bf16 = machine.choose_dtype("cpu", "auto", SHAPES, measure=measured({"bfloat16": 877.0, "float32": 205.0}))
    slow_bf16 = machine.choose_dtype("cpu", "auto", SHAPES, measure=measured({"bfloat16": 143.0, "float32": 240.0}))
    assert (fast_bf16.dtype, fast_bf16.name) == (torch.bfloat16, "bfloat16")
    assert (slow_bf16.dtype, slow_bf16.name) == (None, "float32")
    assert slow_bf16.record()["rates"] == {"bfloat16": 143.0, "float32": 240.0}


def test_an_explicit_dtype_is_kept_without_measuring():
    def refuse(dtype, shapes):
        raise AssertionError("measured although heal.dtype was given")

    assert machine.choose_dtype("cpu", "bfloat16", SHAPES, measure=refuse).dtype == torch.bfloat16
    assert machine.choose_dtype("cpu", "float32", SHAPES, measure=refuse).dtype is None


def test_matmul_rate_is_a_real_positive_rate_for_both_dtypes():
    for dtype in (torch.float32, torch.bfloat16):
        rate = machine.matmul_rate(dtype, SHAPES, seconds=0.05)
        assert math.isfinite(rate) and rate > 0.01, (dtype, rate)


def test_heal_shapes_are_the_models_and_capped_in_work():
    shapes = machine.heal_shapes(1024, 576, 1536, 49152)
    assert [s[1:] for s in shapes] == [(576, 1536), (1536, 576), (1024, 576), (576, 49152)]
    assert all(machine.matmul_flops(s) <= 1.1 * machine.SHAPE_GFLOP * 1e9 for s in shapes)
    assert shapes[0][0] == 565 and shapes[3][0] == 17


# ---------------------------------------------------------------- losses equal the reference
def _reference_hidden_mse(student, teacher, batch):  # the formula before the fused version
    terms = []
    for s in batch.matched_layers:
        target = teacher.layers[batch.student_to_teacher[s]][batch.mask].float()
        diff = student.layers[s][batch.mask].float() - target
        terms.append(diff.pow(2).mean() / target.pow(2).mean().clamp_min(1e-12))
    return torch.stack(terms).mean()


@pytest.mark.parametrize("padded", [False, True])
def test_hidden_mse_equals_the_reference_in_value_and_gradient(padded):
    torch.manual_seed(4)
    teacher_layers = {i: torch.randn(2, 9, 8, dtype=torch.float64) * (i + 1) for i in range(5)}
    student_layers = {i: torch.randn(2, 9, 8, dtype=torch.float64, requires_grad=True) for i in range(3)}
    mask = torch.ones(2, 9, dtype=torch.bool)
    if padded:
        mask[1, 6:] = False
    head = distill.Head(torch.randn(10, 8))
    s = distill.ForwardOut(torch.zeros(2, 9, 8), head, student_layers)
    t = distill.ForwardOut(torch.zeros(2, 9, 8), head, teacher_layers)
    batch = distill.Batch(torch.zeros(2, 9, dtype=torch.long), mask, student_to_teacher=[0, 3, 4],
                          matched_layers=[0, 1, 2])

    fast = distill.hidden_mse_loss(s, t, batch)
    fast.backward()
    grads = [student_layers[i].grad.clone() for i in range(3)]
    for layer in student_layers.values():
        layer.grad = None
    reference = _reference_hidden_mse(s, t, batch)
    reference.backward()

    assert fast.item() > 0.1
    torch.testing.assert_close(fast.double(), reference.double(), rtol=1e-6, atol=1e-9)
    for i in range(3):
        torch.testing.assert_close(grads[i], student_layers[i].grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("padded", [False, True])
def test_kl_on_real_rows_equals_the_plain_kl_in_value_and_gradient(padded):
    torch.manual_seed(5)
    hs = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    ht = torch.randn(2, 7, 16, dtype=torch.float64)
    ws, wt = torch.randn(50, 16, dtype=torch.float64), torch.randn(50, 16, dtype=torch.float64)
    mask = torch.ones(2, 7, dtype=torch.bool)
    if padded:
        mask[0, 5:] = False
    s, t = distill.ForwardOut(hs, distill.Head(ws)), distill.ForwardOut(ht, distill.Head(wt))
    batch = distill.Batch(torch.zeros(2, 7, dtype=torch.long), mask, temperature=2.0, chunk_tokens=4)

    fast = distill.kl_loss(s, t, batch)
    fast.backward()
    grad = hs.grad.clone()
    hs.grad = None
    plain = distill.plain_kl(hs[mask] @ ws.t(), ht[mask] @ wt.t(), temperature=2.0)
    plain.backward()

    torch.testing.assert_close(fast.double(), plain.double(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, hs.grad, rtol=1e-4, atol=1e-7)


def test_real_rows_is_a_view_without_padding_and_a_selection_with_it():
    states = torch.randn(2, 3, 4)
    full = torch.ones(2, 3, dtype=torch.bool)
    assert distill.real_rows(states, full).data_ptr() == states.data_ptr()
    padded = full.clone()
    padded[1, 2] = False
    torch.testing.assert_close(distill.real_rows(states, padded), states[padded])


# ---------------------------------------------------------------- only what a loss uses
@pytest.fixture(scope="module")
def teacher_dir(tiny_model_dir):
    return tiny_model_dir("llama", 6)


def test_forward_captures_only_the_layers_asked_for_and_leaves_no_hooks(teacher_dir):
    model = modelio.load_model(teacher_dir)
    ids = torch.randint(0, 1000, (1, 8))
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        out = trainer.forward(model, ids, mask, [1, 4])
        none = trainer.forward(model, ids, mask, [])
    assert sorted(out.layers) == [1, 4] and none.layers == {}
    assert all(not layer._forward_hooks for layer in trainer.decoder(model).layers)


def test_the_heal_records_its_measured_dtype_choice(teacher_dir, tmp_path):
    student = prune_dir(teacher_dir, tmp_path / "student", [2, 3])
    data = Data.model_validate({"heldout": {"from": "default", "split": "heldout", "samples": 1, "seq_len": 32}})
    settings = Heal(steps=1, batch_size=1, seq_len=32, dtype="auto", checkpoint_every=0)
    result = heal_hooks.heal_model(student, teacher_dir, tmp_path / "healed", settings, data)
    choice = result["dtype"]
    assert set(choice["rates"]) == {"bfloat16", "float32"} and min(choice["rates"].values()) > 0
    assert choice["name"] == machine.faster_dtype(choice["rates"])
    assert result["precision"] == ("bf16 autocast" if choice["name"] == "bfloat16" else "fp32")
    assert result["threads"] == torch.get_num_threads()
