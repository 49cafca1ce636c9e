"""Modelfile stage: pick the Ollama chat family from the HF chat template, write one Modelfile per quant.

A chat family is a Go-template TEMPLATE (``Modelfiles/<family>.tmpl``) plus stop strings
(``Modelfiles/<family>.json``). Families are capabilities (``register_chat_templates``), so a plugin
can add one; ``match(hf_chat_template)`` decides which family an HF Jinja template belongs to.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from ollama_compress.errors import UserError
from ollama_compress.fsutil import atomic_path
from ollama_compress.gguf_verify import verify_gguf
from ollama_compress.hookspecs import hookimpl
from ollama_compress.plugins import capabilities
from ollama_compress.recipe import Ollama
from ollama_compress.safe_read import read_json, read_text
from ollama_compress.templates import check_chat_template

GGUF_CHAT_TEMPLATE_KEY = "tokenizer.chat_template"
PARAMETER_NAME = re.compile(r"[a-z][a-z0-9_]*")


# ---------------------------------------------------------------- built-in families
def _is_qwen25(t: str) -> bool:
    return "<|im_start|>" in t and "<tool_call>" in t and "tools" in t


def _is_chatml(t: str) -> bool:
    return "<|im_start|>" in t and "<|im_end|>" in t


def _is_llama3(t: str) -> bool:
    return "<|start_header_id|>" in t and "<|eot_id|>" in t


def _is_mistral(t: str) -> bool:
    return "[INST]" in t and "<<SYS>>" not in t  # Llama 2's [INST] <<SYS>> is a different format


def _is_phi3(t: str) -> bool:
    return "<|user|>" in t and "<|end|>" in t


def _is_gemma(t: str) -> bool:
    return "<start_of_turn>" in t


# Most specific first: qwen2.5 templates are ChatML too.
BUILTIN_FAMILIES: list[tuple[str, Callable[[str], bool]]] = [
    ("qwen2.5", _is_qwen25),
    ("chatml", _is_chatml),
    ("llama3", _is_llama3),
    ("mistral", _is_mistral),
    ("phi3", _is_phi3),
    ("gemma", _is_gemma),
]


def _family_file(name: str, suffix: str) -> Path:
    return Path(str(resources.files("ollama_compress.Modelfiles") / f"{name}{suffix}"))


def _stops(name: str) -> list[str]:
    return list(json.loads(_family_file(name, ".json").read_text(encoding="utf-8"))["stop"])


@hookimpl
def register_chat_templates(register):
    for name, match in BUILTIN_FAMILIES:
        register(name, match, f"{name} chat format", template_path=str(_family_file(name, ".tmpl")),
                 stops=_stops(name))


# ---------------------------------------------------------------- family lookup
@dataclass
class ChatFamily:
    """A resolved chat family: its name, Go TEMPLATE text and stop strings."""

    name: str
    template: str
    stops: list[str]


def _families() -> dict[str, Any]:
    return capabilities("chat_templates")


def family_names() -> list[str]:
    return sorted(_families())


def chat_family(name: str) -> ChatFamily:
    """The registered family ``name``; UserError listing the known families otherwise."""
    cap = _families().get(name)
    if cap is None:
        raise UserError(f"unknown chat template family '{name}'; known: {', '.join(family_names())}")
    template_path = Path(cap.extra["template_path"])
    stops = list(cap.extra.get("stops", []))
    return ChatFamily(name, template_path.read_text(encoding="utf-8"), stops)


def match_family(hf_chat_template: str | None) -> str | None:
    """The first registered family whose ``match`` accepts the HF Jinja template; None if none."""
    if not hf_chat_template:
        return None
    for name, cap in _families().items():  # plugins' families come before the built-ins
        if cap.fn(hf_chat_template):
            return name
    return None


_CHATML_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system(?:\n|\\n)([^{}<>'\"\\]+?)<\|im_end\|>")


def default_system(hf_chat_template: str | None) -> str | None:
    """The literal default system prompt an HF ChatML template inserts, if it has one.

    SmolLM2 and Qwen2.5 add one when the conversation has no system message; Ollama gets the
    same behaviour from a Modelfile SYSTEM.
    """
    found = _CHATML_DEFAULT_SYSTEM.search(hf_chat_template or "")
    return found.group(1).strip() if found else None


# ---------------------------------------------------------------- reading chat templates
def _template_from_config(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {item.get("name"): item.get("template") for item in value if isinstance(item, dict)}
        return named.get("default") or next((t for t in named.values() if t), None)
    return None


def read_hf_chat_template(model_dir: Path) -> str | None:
    """The chat template of an HF model directory (chat_template.jinja, chat_template.json or
    tokenizer_config.json), or None when it has none."""
    model_dir = Path(model_dir)
    jinja = model_dir / "chat_template.jinja"
    if os.path.lexists(jinja):
        return read_text(jinja, "template")
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = model_dir / name
        if os.path.lexists(path):
            found = _template_from_config(read_json(path, "config", expect=dict).get("chat_template"))
            if found:
                return found
    return None


def read_gguf_chat_template(gguf_path: Path) -> str | None:
    """``tokenizer.chat_template`` from a GGUF file's metadata (checked first), or None."""
    value = verify_gguf(gguf_path).metadata.get(GGUF_CHAT_TEMPLATE_KEY)
    return value if isinstance(value, str) and value else None


# ---------------------------------------------------------------- writing Modelfiles
def _quote(kind: str, text: str) -> str:
    """``text`` in a Modelfile's triple quotes. They end at the first three quotes, so text holding
    three, or ending in a quote (it would close the block early), could add instructions."""
    if '"""' in text or text.endswith('"') or "\0" in text:
        raise UserError(f'the {kind} contains """, ends with a quote or holds a NUL byte, which a Modelfile '
                        'cannot hold in its triple quotes; remove it')
    return f'"""{text}"""'


def _from_line(gguf_path: Path) -> str:
    return f"FROM {_one_line('the GGUF path', str(gguf_path))}"


def _parameter_value(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return f'"{_one_line(f"Modelfile parameter {name}: value", str(value), quoted=True)}"'


def _one_line(what: str, text: str, quoted: bool = False) -> str:
    """``text`` if it stays on its Modelfile line: no line break or NUL, nor a quote when ``quoted``."""
    if any(c in text for c in "\n\r\0" + ('"' if quoted else "")):
        raise UserError(f"{what} {text!r} may not contain line breaks{', quotes' if quoted else ''} or NUL "
                        "(they would end its Modelfile line); change it")
    return text


def merged_parameters(stops: list[str], parameters: dict[str, Any] | None) -> list[tuple[str, Any]]:
    """The family's stops plus the recipe's parameters (its ``stop`` entries are added, not replacing)."""
    rows: list[tuple[str, Any]] = []
    extra = dict(parameters or {})
    user_stops = extra.pop("stop", [])
    if isinstance(user_stops, str):
        user_stops = [user_stops]
    for stop in dict.fromkeys([*stops, *user_stops]):
        rows.append(("stop", stop))
    for name, value in extra.items():
        if not PARAMETER_NAME.fullmatch(name):
            raise UserError(f"'{name}' is not a Modelfile parameter name (lowercase letters, digits, '_')")
        values = value if isinstance(value, list) else [value]
        rows += [(name, v) for v in values]
    return rows


def write_modelfile_text(
    gguf_path: Path,
    hf_chat_template: str | None,
    *,
    family: str | None = None,
    system: str | None = None,
    parameters: dict[str, Any] | None = None,
) -> str:
    """The text of an Ollama Modelfile for ``gguf_path``: FROM, TEMPLATE, SYSTEM, PARAMETERs.

    ``family`` names the chat family; by default it is matched from ``hf_chat_template``, which
    in turn defaults to the GGUF's ``tokenizer.chat_template``. ``system`` defaults to the
    template's own default system prompt, if any.
    """
    gguf_path = Path(gguf_path).resolve()
    if hf_chat_template is None and family is None:
        hf_chat_template = read_gguf_chat_template(gguf_path)
    check_chat_template(hf_chat_template)
    name = family or match_family(hf_chat_template)
    if name is None:
        what = "has no chat template" if not hf_chat_template else "has a chat template of no known family"
        raise UserError(
            f"{gguf_path.name} {what}; set 'ollama.template: <family>' in the recipe (or --template), "
            f"one of: {', '.join(family_names())}"
        )
    chosen = chat_family(name)
    if system is None:
        system = default_system(hf_chat_template)
    lines = [
        f"# Written by ollama-compress; chat family: {chosen.name}",
        _from_line(gguf_path),
        f"TEMPLATE {_quote('template', chosen.template)}",
    ]
    if system:
        lines.append(f"SYSTEM {_quote('system prompt', system)}")
    for key, value in merged_parameters(chosen.stops, parameters):
        lines.append(f"PARAMETER {key} {_parameter_value(key, value)}")
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: Path, out_path: Path, hf_chat_template: str | None = None, **options: Any) -> Path:
    """Write ``write_modelfile_text(...)`` to ``out_path`` atomically; return ``out_path``."""
    text = write_modelfile_text(gguf_path, hf_chat_template, **options)
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return out_path


# ---------------------------------------------------------------- reading Modelfiles back
@dataclass
class ModelfileSpec:
    """What ``register`` needs from a Modelfile (the subset this package writes)."""

    from_path: Path
    template: str | None = None
    system: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


def _typed(text: str) -> Any:
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1]
    return text


def _instructions(text: str, path: Path):
    """Yield (COMMAND, value, quoted) for each instruction; values in triple quotes may span lines."""
    pos = 0
    while pos < len(text):
        end = text.find("\n", pos)
        end = len(text) if end == -1 else end
        line = text[pos:end]
        if not line.strip() or line.strip().startswith("#"):
            pos = end + 1
            continue
        found = re.match(r"\s*(\w+)\s+(.*)", line)
        if found is None:
            raise UserError(f"{path}: cannot read the line {line.strip()!r}")
        command, rest = found.group(1).upper(), found.group(2)
        if rest.startswith('"""'):
            start = pos + found.start(2) + 3
            close = text.find('"""', start)
            if close == -1:
                raise UserError(f'{path}: {command} opens """ but never closes it')
            yield command, text[start:close], True
            end = text.find("\n", close)
            pos = len(text) if end == -1 else end + 1
        else:
            yield command, rest.strip(), False
            pos = end + 1


def parse_modelfile(path: Path) -> ModelfileSpec:
    """Read FROM, TEMPLATE, SYSTEM and PARAMETER lines; UserError on anything else or no FROM."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read Modelfile {path}: {exc}") from None
    values: dict[str, str] = {}
    parameters: dict[str, Any] = {}
    for command, value, quoted in _instructions(text, path):
        if command == "PARAMETER":
            key, _, raw = value.partition(" ")
            raw = _unquote(raw.strip())
            if key == "stop":
                parameters.setdefault("stop", []).append(raw)
            else:
                parameters[key] = _typed(raw)
        elif command in ("FROM", "TEMPLATE", "SYSTEM"):
            values[command] = value if quoted else _unquote(value)
        else:
            raise UserError(f"{path}: {command} is not supported by register; use 'ollama create -f {path}'")
    if "FROM" not in values:
        raise UserError(f"{path} has no FROM line; give a Modelfile written by ollama-compress")
    source = Path(values["FROM"].strip()).expanduser()
    if not source.is_absolute():
        source = (path.parent / source).resolve()
    return ModelfileSpec(source, values.get("TEMPLATE"), values.get("SYSTEM"), parameters)


# ---------------------------------------------------------------- stage
@hookimpl(specname="write_modelfile", trylast=True)
def write_modelfile_stage(ctx, gguf_path, quant, model_dir):
    settings = ctx.recipe.ollama or Ollama()
    hf_template = read_hf_chat_template(model_dir) if model_dir else None
    if hf_template is None and not settings.template:
        hf_template = read_gguf_chat_template(gguf_path)
    family = settings.template or match_family(hf_template)
    out = Path(ctx.out_dir) / f"Modelfile.{quant}"
    write_modelfile(gguf_path, out, hf_template, family=family, system=settings.system, parameters=settings.parameters)
    ctx.metrics.setdefault("modelfiles", {})[quant] = {"path": out.name, "family": family}
    ctx.log(f"wrote {out.name} (chat family {family})")
    return out
