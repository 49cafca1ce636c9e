"""Public benchmarks with EleutherAI's lm-eval, on the HF rows of the evaluation (optional extra).

Turned on by a recipe's ``evaluate.lm_eval`` section (task names; ``include_path`` for a folder of
lm-eval task YAML files, such as a task on a local JSONL file). Adds ``lm_eval: {task: {metric:
value}}`` to the teacher, pruned and healed rows; GGUF rows are left to the built-in evaluator.
lm-eval is imported only when a recipe asks for it: ``pip install 'ollama-compress[lm-eval]'``.
A task YAML can name Python functions (``!function``) in its folder, which lm-eval runs: only
point ``include_path`` at task folders you trust, as with any code you install.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ollama_compress.context import StageContext
from ollama_compress.errors import StageFailed, UserError
from ollama_compress.hookspecs import hookimpl

INSTALL_HINT = "pip install 'ollama-compress[lm-eval]'"


def import_lm_eval() -> Any:
    try:
        import lm_eval
        import lm_eval.tasks
    except ImportError:
        raise UserError(f"evaluate.lm_eval names tasks, but lm-eval is not installed: {INSTALL_HINT}, "
                        "or remove evaluate.lm_eval from the recipe") from None
    return lm_eval


def task_manager(lm_eval: Any, tasks: list[str], include_path: str | None) -> Any:
    """lm-eval's task index: the ``include_path`` folder alone when it has every task, else with
    lm-eval's own tasks; UserError naming tasks found in neither."""
    manager_cls = lm_eval.tasks.TaskManager
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise UserError(f"evaluate.lm_eval.include_path {include_path} is not a folder of lm-eval task YAML files")
        manager = manager_cls(include_path=include_path, include_defaults=False)
        if not set(tasks) - set(manager.all_tasks):
            return manager
    manager = manager_cls(include_path=include_path)
    unknown = sorted(set(tasks) - set(manager.all_tasks))
    if unknown:
        raise UserError(f"evaluate.lm_eval.tasks: lm-eval knows no task {', '.join(unknown)}; define it in a task "
                        "YAML under include_path or check the name with 'lm-eval ls tasks'")
    return manager


def run_lm_eval(model_dir: Path, settings: Any, device: str) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` of lm-eval's HF model on ``model_dir`` (float32, no hub)."""
    lm_eval = import_lm_eval()
    manager = task_manager(lm_eval, list(settings.tasks), settings.include_path)
    try:
        output = lm_eval.simple_evaluate(
            model="hf", model_args={"pretrained": str(model_dir), "dtype": "float32", "trust_remote_code": False},
            tasks=list(settings.tasks), num_fewshot=settings.num_fewshot, limit=settings.limit,
            batch_size=settings.batch_size, device=device, task_manager=manager, log_samples=False,
            bootstrap_iters=0)
    except (OSError, ValueError, KeyError) as exc:
        raise StageFailed(f"lm-eval failed on {model_dir}: {exc}") from None
    results = (output or {}).get("results") or {}
    return {task: {metric.replace(",none", ""): float(value) for metric, value in metrics.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool) and metric != "sample_len"}
            for task, metrics in results.items()}


@hookimpl
def evaluate(ctx: StageContext, model_path: Path) -> dict[str, Any] | None:
    settings = getattr(ctx.settings, "lm_eval", None)
    if settings is None or Path(model_path).suffix == ".gguf":
        return None
    return {"lm_eval": run_lm_eval(Path(model_path), settings, ctx.device)}
