"""Chat templates from strangers' models: checked before we keep, render or write them anywhere.

An HF chat template is Jinja. transformers renders it in ``ImmutableSandboxedEnvironment``; so
does ``render_chat_template`` here. ``check_chat_template`` refuses, before a template is written
into a GGUF, a Modelfile or an imported model, any template that reaches for what a chat template
never needs: dunder or private attributes (``__class__``, ``__globals__``, ``_x``), the ``attr``
filter, Jinja's escape-hatch globals (``self``, ``lipsum``, ``cycler``, ``joiner``, ``config``...),
and ``import``/``include``/``extends`` (templates that load other templates).
"""
from __future__ import annotations

import functools
import json
import resource
import subprocess
import sys
from typing import Any

from jinja2 import nodes
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import UserError

MAX_TEMPLATE_CHARS = 256 * 1024  # real chat templates are a few KiB; tool-use ones up to ~40 KiB
# Names that lead out of the sandbox in known template-injection payloads, refused even if unset.
FORBIDDEN_NAMES = frozenset({
    "self", "lipsum", "cycler", "joiner", "config", "request", "url_for", "get_flashed_messages",
})
FORBIDDEN_FILTERS = frozenset({"attr"})  # ``x|attr('__class__')`` hides a dunder from a static look


def _environment():
    class _Generation(Extension):
        """transformers' ``{% generation %}...{% endgeneration %}`` marks assistant text; renders it as is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols, _Generation])

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    return env


def _refuse(reason: str) -> UserError:
    return UserError(f"chat template refused: {reason}; this template could run code when rendered. "
                     "Use a model with a plain chat template, or set ollama.template / --template to a known family")


def check_chat_template(text: str | None) -> None:
    """UserError if ``text`` (an HF Jinja chat template) is too big, not Jinja, or reaches outside
    the data a chat template is given (see the module docstring). None and "" are fine."""
    if not text:
        return
    if not isinstance(text, str):
        raise UserError(f"chat template is a {type(text).__name__}, not text; fix the model's tokenizer config")
    if len(text) > MAX_TEMPLATE_CHARS:
        raise _refuse(f"{len(text)} characters (at most {MAX_TEMPLATE_CHARS})")
    if "\0" in text:
        raise _refuse("it holds a NUL byte")
    try:
        tree = _environment().parse(text)
    except TemplateSyntaxError as exc:
        raise UserError(f"chat template is not valid Jinja (line {exc.lineno}: {exc.message}); "
                        "fix the model's chat template") from None
    except RecursionError:
        raise _refuse("nested too deeply") from None
    for node in tree.find_all((nodes.Getattr, nodes.Getitem, nodes.Name, nodes.Filter, nodes.Const,
                               nodes.Import, nodes.FromImport, nodes.Include, nodes.Extends)):
        _check_node(node, nodes)


def _check_node(node: Any, nodes: Any) -> None:
    if isinstance(node, (nodes.Import, nodes.FromImport, nodes.Include, nodes.Extends)):
        raise _refuse(f"it loads other templates ({type(node).__name__.lower()}, line {node.lineno})")
    if isinstance(node, nodes.Getattr) and node.attr.startswith("_"):
        raise _refuse(f"it reads the attribute '{node.attr}' (line {node.lineno})")
    if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) \
            and isinstance(node.arg.value, str) and node.arg.value.startswith("_"):
        raise _refuse(f"it reads the item '{node.arg.value}' (line {node.lineno})")
    if isinstance(node, nodes.Name) and node.ctx == "load" and node.name in FORBIDDEN_NAMES:
        raise _refuse(f"it uses the global '{node.name}' (line {node.lineno})")
    if isinstance(node, nodes.Filter) and node.name in FORBIDDEN_FILTERS:
        raise _refuse(f"it uses the '{node.name}' filter (line {node.lineno})")
    if isinstance(node, nodes.Const) and isinstance(node.value, str) and "__" in node.value:
        raise _refuse(f"it spells a dunder name in {node.value[:40]!r} (line {node.lineno})")


# ---------------------------------------------------------------- bounded rendering
RENDER_SECONDS = 10.0  # real templates render in milliseconds; the worker's start is most of this
MAX_RENDER_CHARS = 1 << 20  # a rendered conversation far beyond any context window
RENDER_MEMORY = 1 << 30  # address space of the rendering process
SAMPLE_MESSAGES = [  # what a trial render gives a template: a plain exchange every chat template accepts
    {"role": "user", "content": "Hello, who are you?"},
    {"role": "assistant", "content": "I am a helpful assistant."},
    {"role": "user", "content": "What is 2 + 2?"},
]


def render_chat_template(text: str, messages: list[dict[str, Any]], **variables: Any) -> str:
    """Render a checked chat template in Jinja's immutable sandbox (what transformers does too),
    in a child process with a deadline (RENDER_SECONDS), an output cap (MAX_RENDER_CHARS) and a
    memory cap: nested loops, huge strings or powers stop there, not here. A UserError when the
    template is refused, fails, or breaks a limit."""
    check_chat_template(text)
    request = json.dumps({"template": text, "messages": messages, "variables": variables}, default=str)
    try:
        done = subprocess.run([sys.executable, "-I", "-c", "from ollama_compress.templates import _render_worker; "
                               "_render_worker()"], input=request.encode(), capture_output=True,
                              timeout=RENDER_SECONDS, check=False)
    except subprocess.TimeoutExpired:
        raise UserError(f"chat template refused: it did not finish rendering a conversation within {RENDER_SECONDS:.0f} s "
                        "(runaway loops?); use a model with a plain chat template, or set ollama.template") from None
    try:
        reply = json.loads(done.stdout.decode("utf-8"))
        kind, message = reply["kind"], reply["text"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"chat template refused: rendering it exhausted its limits (exit {done.returncode}); "
                        "use a model with a plain chat template, or set ollama.template") from None
    if kind == "ok":
        return message
    if kind == "security":
        raise _refuse(f"the sandbox stopped it ({message})")
    if kind == "limit":
        raise UserError(f"chat template refused: {message}; use a model with a plain chat template, or set ollama.template")
    raise UserError(f"chat template failed to render: {message}")


def _render_worker() -> None:
    """The child side of ``render_chat_template``: a JSON request on stdin, a JSON reply on stdout."""
    resource.setrlimit(resource.RLIMIT_AS, (RENDER_MEMORY, RENDER_MEMORY))
    cpu = int(RENDER_SECONDS) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    request = json.loads(sys.stdin.buffer.read(MAX_TEMPLATE_CHARS * 8 + (16 << 20)))
    kind, text = _render_bounded(request["template"], request["messages"], request["variables"])
    sys.stdout.write(json.dumps({"kind": kind, "text": text}))


def _render_bounded(text: str, messages: Any, variables: dict[str, Any]) -> tuple[str, str]:
    """(kind, rendered text or reason): kind is ok, security, limit or error."""
    pieces: list[str] = []
    size = 0
    try:
        for piece in _environment().from_string(text).generate(messages=messages, **variables):
            size += len(piece)
            if size > MAX_RENDER_CHARS:
                return "limit", f"it renders more than {MAX_RENDER_CHARS} characters for one conversation"
            pieces.append(piece)
    except SecurityError as exc:
        return "security", str(exc)[:300]
    except MemoryError:
        return "limit", f"rendering it needs more than {RENDER_MEMORY >> 20} MiB"
    except RecursionError:
        return "limit", "it recurses too deeply"
    except (TemplateError, ArithmeticError, TypeError, ValueError, LookupError, AttributeError) as exc:
        return "error", f"{type(exc).__name__}: {str(exc)[:300]}"
    return "ok", "".join(pieces)


def check_template_renders(text: Any, bos_token: str = "", eos_token: str = "") -> None:
    """Before a model's chat template is used in-process (``tokenizer.apply_chat_template``):
    statically checked, and a trial render of a plain conversation finishes within the limits.

    A template that fails on that conversation by its own choice (``raise_exception``) is left
    for its real use to report; one that hangs, floods or escapes is refused here."""
    if isinstance(text, dict):  # several named templates
        for one in text.values():
            check_template_renders(one, bos_token, eos_token)
        return
    if not text:
        return
    _trial_render(text, bos_token or "", eos_token or "")


@functools.lru_cache(maxsize=32)
def _trial_render(text: str, bos_token: str, eos_token: str) -> None:
    try:
        render_chat_template(text, SAMPLE_MESSAGES, add_generation_prompt=True, bos_token=bos_token, eos_token=eos_token)
    except UserError as exc:
        if str(exc).startswith("chat template failed to render"):
            return
        raise
