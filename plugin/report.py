"""``report.md`` with pictures: what a run lost and gained, from its stage files.

Written by the evaluate stage at the end of a run and by ``ollama-compress report RUN_DIR``. Sections:
the evaluation table with "quality retained", quality-vs-size and speed-vs-size plots, layer
importance per metric with the removed layers marked, the heal loss curve (train loss and held-out
KL, from the heal stage's ``train_log.jsonl`` and ``heal.json``), the layer map, greedy answers side
by side, and the Ollama names with the commands to chat with them. Each PNG is drawn with
matplotlib (Agg) and written atomically; the numbers behind them are returned for ``run.json``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

from rich.table import Table

from .errors import UserError
from .fsutil import atomic_path, file_in
from .recipe import MODEL_NAME_RE

MAX_CURVE_POINTS = 200  # heal curve points kept in run.json


# ---------------------------------------------------------------- reading the run
def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def run_inputs(lock: dict[str, Any]) -> dict[str, Any]:
    """The values the stages of a finished run passed on (``outputs`` of each stage, in order)."""
    inputs: dict[str, Any] = {}
    for record in (lock.get("stages") or {}).values():
        inputs.update(record.get("outputs") or {})
    return inputs


def read_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(lock, inputs) of a run directory, or a UserError when it is not one."""
    lock = read_json(Path(run_dir) / "run.json")
    if not isinstance(lock, dict) or "stages" not in lock:
        raise UserError(f"{run_dir} is not a run directory (no readable run.json); give the --out directory "
                        "of an 'ollama-compress run'")
    return lock, run_inputs(lock)


def run_plan(run_dir: Path | None) -> dict[str, Any] | None:
    """The size plan of a run (``plan.json``, written for ``prune.target.size_mb``) when its lock
    (``run.json``) says this run used it, or None."""
    lock = read_json(Path(run_dir) / "run.json") if run_dir is not None else None
    if not isinstance(lock, dict) or not isinstance(lock.get("plan"), dict):
        return None
    plan = read_json(Path(run_dir) / "plan.json")
    return plan if isinstance(plan, dict) and isinstance(plan.get("candidates"), list) else None


def importance(inputs: dict[str, Any]) -> dict[str, Any] | None:
    """``{"scores": {metric: [per layer]}, "removed": [...]}`` from scores.json and layer_map.json."""
    scores_file = inputs.get("scores_file")
    layer_map = layer_map_of(inputs)
    raw = read_json(Path(scores_file)) if scores_file else None
    scores = {k: v for k, v in (raw or {}).items() if isinstance(v, list) and v and isinstance(v[0], (int, float))}
    if not scores and layer_map and isinstance(layer_map.get("scores"), dict):
        scores = {k: v for k, v in layer_map["scores"].items() if isinstance(v, list)}
    if not scores:
        return None
    return {"scores": scores, "removed": sorted((layer_map or {}).get("removed") or [])}


def layer_map_of(inputs: dict[str, Any]) -> dict[str, Any] | None:
    for key in ("pruned_dir", "healed_dir"):
        if inputs.get(key):
            found = read_json(Path(inputs[key]) / "layer_map.json")
            if isinstance(found, dict):
                return found
    return None


def heal_curve(inputs: dict[str, Any]) -> dict[str, Any] | None:
    """Train loss terms per step and held-out KL points, from the healed directory's files."""
    healed = inputs.get("healed_dir")
    if not healed:
        return None
    log = Path(healed) / "train_log.jsonl"
    records = []
    if log.is_file():
        for line in log.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
    summary = read_json(Path(healed) / "heal.json") or {}
    if not records and not summary:
        return None
    every = max(1, len(records) // MAX_CURVE_POINTS)
    kept = records[::every] + ([records[-1]] if records and (len(records) - 1) % every else [])
    train_keys = [k for k in ("loss", "kl", "hidden_mse", "ce", "attention", "lens")
                  if any(isinstance(r.get(k), (int, float)) for r in kept)]
    train = {k: [[r["step"], r[k]] for r in kept if isinstance(r.get(k), (int, float))] for k in train_keys}
    heldout = [[r["step"], r[k]] for r in records for k in r if "heldout" in k and "kl" in k
               and isinstance(r[k], (int, float))]
    if isinstance(summary.get("kl_before"), (int, float)):
        heldout.insert(0, [0, summary["kl_before"]])
    if isinstance(summary.get("kl_after"), (int, float)) and len(heldout) < 2:  # no checks during the heal
        heldout.append([records[-1]["step"] if records else summary.get("steps", 1), summary["kl_after"]])
    best = summary.get("best_step")
    return {"train": train, "heldout_kl": heldout, "best_step": best if isinstance(best, int) else None}


# ---------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    _pyplot().close(fig)
    return path.name


def plot_importance(metric: str, values: list[float], removed: list[int], path: Path) -> str:
    plt = _pyplot()
    gone = set(removed)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(values) + 2), 3.4))
    colors = ["tab:red" if i in gone else "tab:blue" for i in range(len(values))]
    ax.bar(range(len(values)), values, color=colors, hatch=None)
    for i in gone:
        if i < len(values):
            ax.annotate("x", (i, values[i]), ha="center", va="bottom", color="tab:red", fontsize=9)
    ax.set_xlabel("layer of the teacher (0-based); red x: removed")
    ax.set_ylabel(f"{metric} (higher = more important)")
    ax.set_title(f"importance per layer: {metric}")
    ax.set_xticks(range(len(values)))
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_heal(curve: dict[str, Any], path: Path) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for key, points in curve["train"].items():
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], label=f"train {key}")
    if curve["heldout_kl"]:
        pts = curve["heldout_kl"]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], ".-", color="black", label="held-out KL to the teacher")
        best = [p for p in pts if p[0] == curve.get("best_step")]
        if best:  # the weights the heal kept
            ax.plot([best[-1][0]], [best[-1][1]], "*", color="tab:red", markersize=12, label="kept (best)")
    ax.set_xlabel("heal step")
    ax.set_ylabel("loss")
    ax.set_title("heal: train loss and held-out KL")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def frontier(rows: list[dict[str, Any]], key: str, higher_is_better: bool = True) -> list[str]:
    """Names of the GGUF rows, teacher quants and compressed quants together, that no other GGUF row
    beats at the same or a smaller size (on ``key``), smallest first."""
    points = sorted((r for r in rows if r.get("kind") == "gguf" and r.get("size_bytes")
                     and isinstance(r.get(key), (int, float))),
                    key=lambda r: (r["size_bytes"], -r[key] if higher_is_better else r[key]))
    best, names = None, []
    for row in points:
        value = row[key] if higher_is_better else -row[key]
        if best is None or value > best:
            best = value
            names.append(row["name"])
    return names


def _scatter(ax, rows: list[dict[str, Any]], key: str, ylabel: str, reference: float | None = None) -> None:
    """One point per row at (size in MiB, ``key``); squares for the teacher and its quants; the
    ``frontier`` across both families joined by a line."""
    from matplotlib.ticker import ScalarFormatter

    front = {r["name"]: r for r in rows}
    edge = [front[name] for name in frontier(rows, key)]
    if len(edge) > 1:
        ax.plot([r["size_bytes"] / 2**20 for r in edge], [r[key] for r in edge], "-", color="tab:green",
                linewidth=1, zorder=0, label="frontier (best at its size or smaller)")

    for row in rows:
        if not isinstance(row.get(key), (int, float)):
            continue
        x, y = row["size_bytes"] / 2**20, row[key]
        teacher = row["model"] == "teacher"
        ax.scatter(x, y, marker="s" if teacher else "o", color="tab:gray" if teacher else "tab:blue")
        ax.annotate(row["name"], (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    if reference is not None:
        ax.axhline(reference, color="tab:gray", linestyle="--", linewidth=1, label="teacher")
    if reference is not None or len(edge) > 1:
        ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("size (MiB, log scale)")
    ax.set_ylabel(ylabel)


def plot_quality(rows: list[dict[str, Any]], path: Path) -> str:
    fig, ax = _pyplot().subplots(figsize=(6.5, 4.0))
    _scatter(ax, rows, "quality_retained", "quality retained (%)", reference=100.0)
    ax.set_title("quality vs size (squares: the teacher and its quants; green: the frontier)")
    fig.tight_layout()
    return _save(fig, path)


def plot_speed(rows: list[dict[str, Any]], path: Path) -> str:
    fig, (gen, prompt) = _pyplot().subplots(1, 2, figsize=(10.0, 4.0))
    _scatter(gen, rows, "gen_tokens_per_s", "generation tokens/s")
    _scatter(prompt, rows, "prompt_tokens_per_s", "prompt tokens/s")
    fig.suptitle("llama.cpp speed vs size (squares: the teacher's quants; green: the frontier)")
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------- markdown
def _fmt(value: Any, spec: str, scale: float = 1.0) -> str:
    return format(value * scale, spec) if isinstance(value, (int, float)) else "-"


TABLE_COLUMNS = (
    ("model", lambda r: r["name"]), ("size MiB", lambda r: _fmt(r.get("size_bytes"), ".1f", 2**-20)),
    ("perplexity", lambda r: _fmt(r.get("perplexity"), ".3f")), ("KL", lambda r: _fmt(r.get("kl"), ".4g")),
    ("top-1", lambda r: _fmt(r.get("top1_agreement"), ".1f", 100) + "%"),
    ("knowledge", lambda r: _fmt(r.get("knowledge_accuracy"), ".1f", 100) + "%"),
    ("quality retained", lambda r: _fmt(r.get("quality_retained"), ".1f") + "%"),
    ("prompt tok/s", lambda r: _fmt(r.get("prompt_tokens_per_s"), ".0f")),
    ("gen tok/s", lambda r: _fmt(r.get("gen_tokens_per_s"), ".1f")),
)
BUILTIN_KEYS = {"name", "model", "quant", "kind", "path", "size_bytes", "perplexity", "kl", "top1_agreement",
                "knowledge_accuracy", "quality_retained", "prompt_tokens_per_s", "gen_tokens_per_s", "threads",
                "answers", "eval_seconds", "prompt_tokens_per_cpu_s", "gen_tokens_per_cpu_s",
                "speed_threads", "speed_rounds", "load_average", "decode_seconds"}


def table_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| " + " | ".join(c for c, _ in TABLE_COLUMNS) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(TABLE_COLUMNS) - 1)) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(md(fn(row).replace("-%", "-")) for _, fn in TABLE_COLUMNS) + " |")
    return lines


def rich_table(rows: list[dict[str, Any]]):
    """The evaluation table for the terminal."""
    table = Table(title="Against the teacher on the same held-out tokens")
    for header, _ in TABLE_COLUMNS:
        table.add_column(header, justify="left" if header == "model" else "right")
    for row in rows:
        table.add_row(*(fn(row).replace("-%", "-") for _, fn in TABLE_COLUMNS))
    return table


MARKDOWN_ESCAPES = {"&": "&amp;", "<": "&lt;", ">": "&gt;",  # no raw HTML
                    "\\": "\\\\", "`": "\\`", "|": "\\|", "*": "\\*", "[": "\\[", "]": "\\]"}


def md(value: Any) -> str:
    """``value`` (anything read from run data: model, stage, metric and Ollama names, answers) as
    inline Markdown that shows as itself: one line (no heading, list or code fence can start),
    HTML characters as entities, and no code span, table cell, emphasis or link it could open."""
    text = " ".join(str(value).split())
    return "".join(MARKDOWN_ESCAPES.get(c, c if c.isprintable() else " ") for c in text)


def _cell(text: Any) -> str:
    return md(text) or "(empty)"


def verdict_lines(verdicts: list[dict[str, Any]]) -> list[str]:
    """"Worth it at equal size": one sentence per compressed quant (``evaluation.verdict_sentence``)."""
    if not verdicts:
        return []
    return ["## Worth it at equal size", "",
            "Each compressed quant against the teacher quant that does best (lowest KL) at its size or "
            "smaller; decode speed of the two files run in turn on the same machine load.", "",
            *(f"- {md(v['sentence'])}" for v in verdicts), ""]


def answers_lines(evaluation: dict[str, Any]) -> list[str]:
    lines = []
    for i, prompt in enumerate(evaluation.get("prompts") or []):
        lines += [f"**{_cell(prompt)}**", "", "| model | answer |", "|---|---|"]
        for row in evaluation["rows"]:
            answers = row.get("answers") or []
            if i < len(answers):
                lines.append(f"| {_cell(row.get('name'))} | {_cell(answers[i])} |")
        lines.append("")
    return lines


def extra_metric_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Metrics other plugins added (lm-eval and the like), one line per row."""
    lines = []
    for row in rows:
        extra = {k: v for k, v in row.items() if k not in BUILTIN_KEYS and v is not None}
        if extra:
            lines.append(f"- **{_cell(row.get('name'))}**: " + md(json.dumps(extra, sort_keys=True, default=str)))
    return lines


def layer_map_lines(layer_map: dict[str, Any]) -> list[str]:
    kept = layer_map.get("student_to_teacher") or []
    lines = [md(f"{layer_map.get('num_layers_before', '?')} -> {layer_map.get('num_layers_after', len(kept))} "
                f"layers; removed (teacher indices): {layer_map.get('removed') or []}; chosen by "
                f"{_chosen_by(layer_map)}."), "",
             "| student layer | teacher layer |", "|---:|---:|"]
    lines += [f"| {s} | {md(t)} |" for s, t in enumerate(kept)]
    return lines


def _chosen_by(layer_map: dict[str, Any]) -> str:
    if (layer_map.get("select") or {}).get("candidates"):
        return "measured KL (above)"
    return layer_map.get("metric") or "explicit layers"


def candidate_lines(layer_map: dict[str, Any]) -> list[str]:
    """The cuts ``prune.select: measured`` tried, lowest KL first, the chosen one in bold; when they
    were screened, the screen's KL too, and the cuts it dropped after the finalists."""
    select = layer_map.get("select") or {}
    candidates = sorted(select.get("candidates") or [],
                        key=lambda c: ("kl" not in c, c.get("kl", 0.0), c.get("screen_kl", 0.0)))
    if not candidates:
        return []
    screen = any("screen_kl" in c for c in candidates)
    lines = [f"Cut chosen by measured KL to the teacher on calibration text (repair: {select.get('repair')}):", "",
             "| removed | candidate of | KL |" + (" screen KL |" if screen else ""),
             "|---|---|---:|" + ("---:|" if screen else "")]
    for c in candidates:
        mark = "**" if c["removed"] == select.get("chosen") else ""
        kl = f"{c['kl']:.4f}" if "kl" in c else "-"
        lines.append(f"| {mark}{c['removed']}{mark} | {c['by']} | {kl} |"
                     + (f" {c['screen_kl']:.4f} |" if screen else ""))
    if screen:
        lines += ["", "Every cut was first screened on fewer windows (screen KL); the lowest were then "
                      "scored on all of them (KL)."]
    return lines + [""]


def plan_lines(plan: dict[str, Any]) -> list[str]:
    """The size plan: its sentence, then every candidate with its sizes and KL on calibration text."""
    lines = [md(plan.get("sentence", "")), "",
             "| candidate | kind | quant | layers removed | estimated MiB | real MiB | KL (calibration) | note |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    chosen = (plan.get("choice") or {}).get("label")
    for c in plan["candidates"]:
        mark = "**" if c.get("label") == chosen else ""
        note = c.get("dropped") or ("before the heal" if c.get("before_heal") else "")
        lines.append(f"| {mark}{md(c.get('label'))}{mark} | {md(c.get('kind'))} | {md(c.get('quant'))} | "
                     f"{md(c.get('layers_removed'))} | {_fmt(c.get('estimated_mib'), '.1f')} | "
                     f"{_fmt(c.get('real_mib'), '.1f')} | {_fmt(c.get('kl'), '.4f')} | {md(note)} |")
    return lines + [""]


def ollama_lines(inputs: dict[str, Any]) -> list[str]:
    models = inputs.get("ollama_models") or {}
    modelfiles = inputs.get("modelfiles") or {}
    if not models:
        if modelfiles:
            return ["Modelfiles were written but nothing was registered: " +
                    ", ".join(md(p) for p in modelfiles.values())]
        return ["No Ollama models were registered in this run."]
    lines = ["```", "ollama serve   # if no Ollama server is running"]
    # in a code block only names Ollama accepts (no backtick or line break can end the block)
    lines += [f"ollama run {name}" for name in models.values() if isinstance(name, str) and MODEL_NAME_RE.fullmatch(name)]
    lines += ["```", "", "| quant | Ollama name | Modelfile |", "|---|---|---|"]
    lines += [f"| {md(q)} | {md(name)} | {md(modelfiles.get(q, '-'))} |" for q, name in models.items()]
    return lines


# ---------------------------------------------------------------- the report
def write_report(out_dir: Path, title: str, evaluation: dict[str, Any] | None,
                 inputs: dict[str, Any], plan: dict[str, Any] | None = None) -> tuple[Path, dict[str, Any]]:
    """Write ``report.md`` and its PNGs into ``out_dir``; return (path, the numbers behind the plots).
    ``plan``: the run's size plan (``run_plan``), shown first when there is one."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Any] = {}
    lines = [f"# {md(title)}: what was lost and gained", ""]
    if plan:
        lines += ["## Size plan: cut + quant or quantize only", "", *plan_lines(plan)]
    rows = (evaluation or {}).get("rows") or []
    if rows:
        lines += ["## Evaluation", "",
                  f"Every row against the teacher on the same {md(evaluation.get('heldout_tokens', '?'))} held-out "
                  f"tokens ({md(evaluation.get('heldout_windows', '?'))} windows); knowledge: "
                  f"{md(evaluation.get('knowledge_questions', 0))} multiple-choice questions scored by log-likelihood; "
                  "tokens/s: llama.cpp, GGUF rows only.", ""]
        if evaluation.get("quality_retained"):  # the definition, as evaluation.json states it
            lines += [f"*{evaluation['quality_retained']}.*", ""]
        lines += [*table_lines(rows), ""]
        extra = extra_metric_lines(rows)
        if extra:
            lines += ["Other metrics (plugins):", "", *extra, ""]
        sized = [r for r in rows if r.get("size_bytes")]
        quality = [{"name": r["name"], "size_bytes": r["size_bytes"], "quality_retained": r.get("quality_retained")}
                   for r in sized]
        png = plot_quality(sized, out_dir / "quality_vs_size.png")
        figures["quality_vs_size"] = {"file": png, "points": quality, "frontier": frontier(sized, "quality_retained")}
        lines += [f"![quality vs size]({png})", ""]
        fast = [r for r in sized if isinstance(r.get("gen_tokens_per_s"), (int, float))]
        if fast:
            png = plot_speed(fast, out_dir / "speed_vs_size.png")
            figures["speed_vs_size"] = {"file": png, "frontier": frontier(fast, "gen_tokens_per_s"), "points": [
                {k: r.get(k) for k in ("name", "size_bytes", "prompt_tokens_per_s", "gen_tokens_per_s", "speed_threads")}
                for r in fast]}
            lines += [f"![speed vs size]({png})", ""]
        lines += verdict_lines(evaluation.get("verdicts") or [])
    else:
        lines += ["No evaluation in this run: add an `evaluate` section to the recipe, or run "
                  "`ollama-compress evaluate RUN_DIR`.", ""]
    scores = importance(inputs)
    if scores:
        lines += ["## Layer importance", ""]
        pngs = [plot_importance(m, v, scores["removed"], file_in(out_dir, f"importance_{m}.png", "metric name"))
                for m, v in scores["scores"].items()]
        figures["importance"] = {**scores, "files": pngs}
        lines += [f"![importance {md(m)}]({quote(png)})" for m, png in zip(scores["scores"], pngs)] + [""]
    curve = heal_curve(inputs)
    lines += ["## Heal", ""]
    if curve:
        png = plot_heal(curve, out_dir / "heal_curve.png")
        figures["heal_curve"] = {**curve, "file": png}
        lines += [f"![heal loss curve]({png})", ""]
    else:
        lines += ["No heal in this run (no healed model, or its train_log.jsonl is missing).", ""]
    layer_map = layer_map_of(inputs)
    if layer_map:
        lines += ["## Layer map", "", *candidate_lines(layer_map), *layer_map_lines(layer_map), ""]
    if rows and any(r.get("answers") for r in rows):
        lines += ["## Greedy answers, side by side", "", *answers_lines(evaluation)]
    lines += ["## Ollama", "", *ollama_lines(inputs), ""]
    path = out_dir / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines), encoding="utf-8")
    return path, figures
