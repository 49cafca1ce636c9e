"""The plugin manager. Built-in stages load through the entry-point group like any third party."""
from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import pluggy

from . import __version__, hookspecs
from .errors import NotAvailable, UserError
from .recipe import Recipe, add_name_check

GROUP = "ollama_compress"
LOAD_ENV = "OLLAMA_COMPRESS_LOAD_PLUGINS"

# The built-in plugins, as declared in pyproject's entry points; used when the package runs from a
# source tree without installed metadata.
DEFAULT_PLUGINS = {
    "source": "ollama_compress.hooks.source",
    "data": "ollama_compress.hooks.data",
    "importance": "ollama_compress.hooks.importance",
    "prune": "ollama_compress.hooks.prune",
    "heal": "ollama_compress.hooks.heal",
    "export": "ollama_compress.hooks.export",
    "quantize": "ollama_compress.hooks.quantize",
    "modelfile": "ollama_compress.hooks.modelfile",
    "registration": "ollama_compress.hooks.registration",
    "ollama_source": "ollama_compress.hooks.ollama_source",
    "stages": "ollama_compress.hooks.stages",
    "evaluate": "ollama_compress.hooks.evaluate",
    "lm_eval": "ollama_compress.hooks.lm_eval_plugin",
}

CAPABILITY_HOOKS = {
    "importance_metrics": "register_importance_metrics",
    "losses": "register_losses",
    "sources": "register_sources",
    "data_sources": "register_data_sources",
    "chat_templates": "register_chat_templates",
}

_pm: pluggy.PluginManager | None = None
_dists: dict[str, md.Distribution] = {}
_capabilities: dict[str, dict[str, "Capability"]] = {}


@dataclass
class Capability:
    """One named thing a plugin registered (a metric, a loss, a source scheme, ...)."""

    name: str
    fn: Any
    description: str
    plugin: str
    extra: dict[str, Any] = field(default_factory=dict)  # kind-specific details (chat templates: template_path, stops)


def _is_builtin(module: str) -> bool:
    return module.startswith("ollama_compress.hooks")


def _wanted_external() -> set[str] | None:
    raw = os.environ.get(LOAD_ENV)
    if raw is None:
        return None
    return {name.strip() for name in raw.split(",") if name.strip()}


def _load(pm: pluggy.PluginManager) -> None:
    wanted = _wanted_external()
    builtin_seen = set()
    for ep in md.entry_points(group=GROUP):
        builtin = _is_builtin(ep.value)
        if not builtin and wanted is not None and ep.name not in wanted and ep.dist.name not in wanted:
            continue
        if pm.get_plugin(ep.name) is not None:
            continue
        module = _import_plugin(ep.name, ep.load)
        if module is None:
            continue
        pm.register(module, name=ep.name)
        _dists[ep.name] = ep.dist
        if builtin:
            builtin_seen.add(ep.name)
    for name, module in DEFAULT_PLUGINS.items():
        if name not in builtin_seen and pm.get_plugin(name) is None:
            loaded = _import_plugin(name, lambda: importlib.import_module(module))
            if loaded is not None:
                pm.register(loaded, name=name)


def _import_plugin(name: str, load: Callable[[], Any]) -> Any:
    """Import one plugin; a broken plugin is reported on stderr and left out, never fatal."""
    try:
        return load()
    except Exception as exc:  # any import-time error of a plugin
        print(f"warning: plugin '{name}' failed to load and is left out: {exc}", file=sys.stderr)
        return None


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with built-in and allowed external plugins loaded."""
    global _pm
    if _pm is None:
        pm = pluggy.PluginManager(GROUP)
        pm.add_hookspecs(hookspecs)
        _load(pm)
        _check_pending(pm)
        _pm = pm
    return _pm


def reset() -> None:
    """Forget the plugin manager and registries (tests, or after installing a plugin)."""
    global _pm
    _pm = None
    _capabilities.clear()


def _check_pending(pm: pluggy.PluginManager) -> None:
    """A hookimpl whose name matches no hook (a misspelling) is an error that names it."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        problem = str(exc).split(" in plugin ")[0]
        raise UserError(f"plugin '{pm.get_name(exc.plugin)}': {problem}; fix the hook's name or uninstall "
                        "the plugin") from None


def register_plugin(plugin: object, name: str) -> None:
    """Register a plugin object at run time (tests, notebooks)."""
    pm = get_plugin_manager()
    pm.register(plugin, name=name)
    _check_pending(pm)
    _capabilities.clear()


def capabilities(kind: str) -> dict[str, Capability]:
    """All registered capabilities of ``kind`` (see ``CAPABILITY_HOOKS``), by name.

    Third-party plugins come first and win over a built-in of the same name.
    """
    if kind not in _capabilities:
        hook = getattr(get_plugin_manager().hook, CAPABILITY_HOOKS[kind])
        builtin: dict[str, Capability] = {}
        external: dict[str, Capability] = {}
        for impl in hook.get_hookimpls():
            found = builtin if _is_builtin(getattr(impl.plugin, "__name__", "")) else external

            def register(name: str, fn: Any, description: str = "", _found=found, _p=impl.plugin_name,
                         **extra: Any) -> None:
                _found[name] = Capability(name, fn, description, _p, extra)

            impl.function(register=register)
        _capabilities[kind] = {**external, **{k: v for k, v in builtin.items() if k not in external}}
    return _capabilities[kind]


def capability(kind: str, name: str) -> Capability:
    """The capability ``name`` of ``kind``, or NotAvailable listing the known names."""
    known = capabilities(kind)
    if name not in known:
        raise NotAvailable(_unknown(kind, name, known))
    return known[name]


def _unknown(kind: str, name: str, known: dict[str, Capability]) -> str:
    singular = kind.removesuffix("es") if kind.endswith("sses") else kind.removesuffix("s")
    return f"unknown {singular.replace('_', ' ')} '{name}'; known: {', '.join(sorted(known)) or 'none'}"


def unknown_capability_names(recipe: Recipe) -> list[str]:
    """One located line per name in ``recipe`` that no loaded plugin registered (losses, metrics,
    data sources); run by ``recipe.validate`` once this module is loaded."""
    wanted: list[tuple[str, str, list[str]]] = [
        ("data_sources", "data.calibration.from", [recipe.data.calibration.from_]),
        ("data_sources", "data.heldout.from", [recipe.data.heldout.from_]),
        ("data_sources", "data.heal", [spec.from_ for spec in recipe.data.heal_sources()]),
    ]
    if recipe.prune is not None:
        wanted.append(("importance_metrics", "prune.metric", [recipe.prune.metric]))
        wanted.append(("importance_metrics", "prune.report_metrics", recipe.prune.report_metrics))
    if recipe.heal is not None:
        wanted.append(("losses", "heal.loss", list(recipe.heal.loss)))
    problems = []
    for kind, where, names in wanted:
        known = capabilities(kind)
        problems += [f"{where}: {_unknown(kind, name, known)}" for name in dict.fromkeys(names) if name not in known]
    return problems


add_name_check(unknown_capability_names)


def describe_plugins() -> list[dict[str, Any]]:
    """Name, version and implemented hooks of each loaded plugin (for ``ollama-compress plugins``)."""
    pm = get_plugin_manager()
    rows = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda item: item[0]):
        dist = _dists.get(name)
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        rows.append(
            {
                "name": name,
                "version": dist.version if dist else __version__,
                "builtin": _is_builtin(getattr(plugin, "__name__", "")),
                "hooks": hooks,
            }
        )
    return rows


def call_first(hook_name: str, **kwargs: Any) -> Any:
    """Call a first-result stage hook; NotAvailable if no installed plugin handled it."""
    result = getattr(get_plugin_manager().hook, hook_name)(**kwargs)
    if result is None:
        raise NotAvailable(f"no installed plugin implements '{hook_name}' for this input")
    return result


