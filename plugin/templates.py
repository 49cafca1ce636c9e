"""Chat templates from strangers' models: checked before we keep, render or write them anywhere.

An HF chat template is Jinja. transformers renders it in ``ImmutableSandboxedEnvironment``; so
does ``render_chat_template`` here. ``check_chat_template`` refuses, before a template is written
into a GGUF, a Modelfile or an imported model, any template that reaches for what a chat template
never needs: dunder or private attributes (``__class__``, ``__globals__``, ``_x``), the ``attr``
filter, Jinja's escape-hatch globals (``self``, ``lipsum``, ``cycler``, ``joiner``, ``config``...),
and ``import``/``include``/``extends`` (templates that load other templates).
"""
from __future__ import annotations

from typing import Any

from .errors import UserError

MAX_TEMPLATE_CHARS = 256 * 1024  # real chat templates are a few KiB; tool-use ones up to ~40 KiB
# Names that lead out of the sandbox in known template-injection payloads, refused even if unset.
FORBIDDEN_NAMES = frozenset({
    "self", "lipsum", "cycler", "joiner", "config", "request", "url_for", "get_flashed_messages",
})
FORBIDDEN_FILTERS = frozenset({"attr"})  # ``x|attr('__class__')`` hides a dunder from a static look


def _environment():
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(Extension):
        """transformers' ``{% generation %}...{% endgeneration %}`` marks assistant text; renders it as is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            from jinja2 import nodes

            return nodes.Scope(body, lineno=lineno)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols, _Generation])

    def raise_exception(message: str) -> None:
        from jinja2.exceptions import TemplateError

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
    from jinja2 import nodes
    from jinja2.exceptions import TemplateSyntaxError

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


def render_chat_template(text: str, messages: list[dict[str, Any]], **variables: Any) -> str:
    """Render a checked chat template in Jinja's immutable sandbox (what transformers does too)."""
    from jinja2.exceptions import SecurityError, TemplateError

    check_chat_template(text)
    try:
        return _environment().from_string(text).render(messages=messages, **variables)
    except SecurityError as exc:
        raise _refuse(f"the sandbox stopped it ({exc})") from None
    except TemplateError as exc:
        raise UserError(f"chat template failed to render: {exc}") from None
