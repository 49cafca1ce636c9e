"""The heal on two real processes (accelerate launch, gloo on CPU): the same weights as one process
with the same effective batch, a SIGTERM to the launcher leaves a checkpoint that a resume
finishes, and a rank that raises ends the whole run with its message instead of hanging."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers import cli, write_recipe
from ollama_compress import trainer
from ollama_compress.hooks.prune import prune_dir

CPU_CONFIG = Path(__file__).resolve().parents[1] / "recipes" / "accelerate" / "cpu-processes.yaml"
LAUNCH_TIMEOUT = 240  # seconds; a tiny model on a loaded 2-core machine takes about one minute
HELDOUT = "data.heldout={from: default, split: heldout, samples: 1, seq_len: 16}"
FAILING_RANK_SCRIPT = '''
import os, sys
from ollama_compress import plugins
from ollama_compress.hookspecs import hookimpl

class FailsOnRankOne:
    @staticmethod
    @hookimpl
    def register_losses(register):
        def fails_on_rank_one(student, teacher, batch):
            if os.environ.get("RANK") == "1":
                raise RuntimeError("rank 1 failed on purpose")
            return student.final.float().mean() * 0
        register("fails_on_rank_one", fails_on_rank_one, "raises in process 1")

plugins.register_plugin(FailsOnRankOne(), name="fails-on-rank-one")
from ollama_compress.cli import main
main(sys.argv[1:])
'''


@pytest.fixture(scope="module")
def models(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    teacher = tiny_model_dir("llama", 6)
    return prune_dir(teacher, tmp_path_factory.mktemp("pruned") / "student", [2, 3]), teacher


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(*args: str) -> list[str]:
    """``accelerate launch`` of two CPU processes running ARGS (``-m ollama_compress ...`` or a script)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_CONFIG),
            "--num_processes", "2", "--main_process_port", str(_free_port()), *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _heal_args(student: Path, teacher: Path, out: Path, *extra: str) -> list[str]:
    return ["heal", str(student), "--teacher", str(teacher), "--out", str(out), "--set", "heal.batch_size=2",
            "--set", "heal.micro_batch=1", "--set", "heal.seq_len=16", "--set", "heal.dtype=float32",
            "--set", "heal.lr=1e-3", "--set", HELDOUT, *extra]


def test_two_processes_reach_the_weights_of_one_process_with_the_same_batch(models, tmp_path):
    student, teacher = models
    extra = ("--steps", "3", "--set", "heal.eval_every=0")
    one = cli(*_heal_args(student, teacher, tmp_path / "one", *extra), env={"OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr
    two = subprocess.run(_launch("-m", "ollama_compress", *_heal_args(student, teacher, tmp_path / "two", *extra)),
                         capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env=_env())
    assert two.returncode == 0, two.stderr[-3000:]
    assert "x 2 processes" in two.stderr
    a, b = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    before = load_file(str(student / "model.safetensors"))
    assert a.keys() == b.keys()
    assert max(float((a[k] - before[k]).abs().max()) for k in a) > 1e-3  # the heal moved the weights
    for name in a:
        assert float((a[name] - b[name]).abs().max()) <= 1e-6, name


def test_sigterm_to_the_launcher_leaves_a_checkpoint_that_a_resume_finishes(models, tmp_path):
    student, teacher = models
    out, checkpoints = tmp_path / "healed", tmp_path / "ckpt"
    args = _heal_args(student, teacher, out, "--steps", "60", "--checkpoints", str(checkpoints),
                      "--set", "heal.checkpoint_every=0", "--set", "heal.eval_every=0")
    launcher = subprocess.Popen(_launch("-m", "ollama_compress", *args), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env=_env(), start_new_session=True)
    log = checkpoints / "train_log.jsonl"
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while launcher.poll() is None and time.monotonic() < deadline:
        if log.is_file() and len(log.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    assert launcher.poll() is None, launcher.stderr.read()[-3000:]
    launcher.send_signal(signal.SIGTERM)
    try:
        _, stderr = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode != 0
    saved = trainer.latest_checkpoint(checkpoints)
    assert saved is not None, stderr[-3000:]
    assert "SIGTERM at step" in stderr
    assert not out.exists()

    resumed = subprocess.run(_launch("-m", "ollama_compress", *args, "--resume"), capture_output=True, text=True,
                             timeout=LAUNCH_TIMEOUT, env=_env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {saved}" in resumed.stderr
    assert (out / "model.safetensors").is_file()
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 60


def test_a_rank_that_raises_ends_the_whole_run_with_its_message(models, tmp_path):
    student, teacher = models
    script = tmp_path / "fails_on_rank_one.py"
    script.write_text(FAILING_RANK_SCRIPT)
    args = _heal_args(student, teacher, tmp_path / "never", "--steps", "50",
                      "--set", "heal.loss={kl: 1, fails_on_rank_one: 1}")
    started = time.monotonic()
    proc = subprocess.run(_launch(str(script), *args), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT,
                          env=_env())
    assert proc.returncode != 0
    assert "rank 1 failed on purpose" in proc.stderr
    assert time.monotonic() - started < LAUNCH_TIMEOUT
    assert not (tmp_path / "never").exists()


def test_run_under_the_launcher_heals_only_and_rank_0_writes_the_run(models, tmp_path):
    _, teacher = models
    recipe = write_recipe(tmp_path / "tiny.yaml", teacher, "tiny-run", prune={"layers": [2, 3]},
                          data={"heldout": {"split": "heldout", "samples": 1, "seq_len": 16}},
                          heal={"steps": 2, "batch_size": 2, "micro_batch": 1, "seq_len": 16, "dtype": "float32",
                                "eval_every": 1})
    out = tmp_path / "run"
    assert cli("run", recipe, "--out", out, "--until", "prune").returncode == 0
    refused = subprocess.run(_launch("-m", "ollama_compress", "run", str(recipe), "--out", str(out)),
                             capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env=_env())
    assert refused.returncode != 0
    assert "only the heal stage runs: add --from heal --until heal" in refused.stderr
    healed = subprocess.run(_launch("-m", "ollama_compress", "run", str(recipe), "--out", str(out),
                                    "--from", "heal", "--until", "heal"),
                            capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env=_env())
    assert healed.returncode == 0, healed.stderr[-3000:]
    import json

    heal = json.loads((out / "run.json").read_text())["stages"]["heal"]
    assert heal["status"] == "done" and heal["metrics"]["processes"] == 2
    assert [p[0] for p in heal["metrics"]["heldout_curve"]] == [0, 1, 2]
    assert (out / "30-healed" / "model" / "model.safetensors").is_file()
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
