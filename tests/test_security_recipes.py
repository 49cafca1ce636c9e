"""Hostile recipes and --set overrides: never an import, never code, never a path outside the run
directory, every refusal one line; YAML bombs refused fast; one Ollama name rule everywhere."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import assert_clean_error, cli
from ollama_compress.errors import UserError
from ollama_compress.fsutil import resolve_inside
from ollama_compress.hosts import is_loopback
from ollama_compress.recipe import MODEL_NAME_RE, Recipe, check_ollama_name, load_recipe, parse_yaml

EXAMPLES = int(os.environ.get("OLLAMA_COMPRESS_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                derandomize="OLLAMA_COMPRESS_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# Modules nothing imports, named inside recipes: if a recipe could name code, one would appear.
CANARY_MODULES = ("this", "antigravity", "tabnanny", "pydoc_data.topics", "xdrlib")
BASE = {
    "recipe_version": 1,
    "name": "fuzz",
    "source": {"model": "/nowhere"},
    "prune": {"remove": 2},
    "export": {"quants": ["Q8_0"]},
    "ollama": {"name": "fuzz"},
}
KEYS = [
    "name", "description", "recipe_version", "source.model", "source.revision", "source.gguf_file",
    "source.dtype", "source.trust_remote_code", "data.calibration.from", "data.calibration.path",
    "data.calibration.samples", "data.heldout.path", "prune.metric", "prune.report_metrics", "prune.remove",
    "prune.layers", "prune.protect", "heal.teacher", "heal.loss.kl", "heal.loss", "export.quants",
    "export.outtype", "export.imatrix", "ollama.name", "ollama.host", "ollama.system", "ollama.template",
    "ollama.parameters.stop", "ollama.parameters", "plugins", "import", "__class__", "source.__init__",
]
HOSTILE = [
    "../../../tmp/escape", "/etc/passwd", "a\0b", "~root/.ssh/id_rsa", "..", "x/../../y", "os.system",
    "my_pkg.evil.fn", "__import__('os').system('touch MARK')", "$(touch MARK)", "`touch MARK`",
    "!!python/object/apply:os.system ['touch MARK']", "http://evil.example:11434", "10.0.0.1",
    "evil.example/ns/model:tag", "ns.bad/model", "a" * 300, "Q9_X", "F8", "block_influence", "-1",
    *CANARY_MODULES, "http://127.0.0.1:11434", "localhost:11435", "library/model:Q4_K_M",
]
TAGS = [
    "!!python/object/apply:os.system ['touch MARK']", "!!python/name:os.system",
    "!!python/object/new:subprocess.Popen [['touch', 'MARK']]", "!!python/module:this", "!!binary aGk=",
    "!!set {a, b}", "!!timestamp 2001-12-14", "&a [*a]",
]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                    st.text(max_size=20), st.sampled_from(HOSTILE))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(HOSTILE[:6] + ["kl", "x"]), inner, max_size=3)),
    max_leaves=8)


def _set(data: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    node = data
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[last] = value


def _text_with(marker: Path, edits: list[tuple[str, object]], tag: str | None) -> str:
    data = yaml.safe_load(yaml.safe_dump(BASE))
    for key, value in edits:
        _set(data, key, value)
    text = yaml.safe_dump(data, allow_unicode=True)
    if tag is not None:
        text += f"extra: {tag.replace('MARK', str(marker))}\n"
    return text.replace("MARK", str(marker))


def _check_accepted(recipe: Recipe, tmp_path: Path) -> None:
    """What an accepted recipe makes paths from stays inside the run directory."""
    runs = tmp_path / "runs"
    run_dir = resolve_inside(runs, recipe.name, "recipe name")
    assert run_dir.parent == runs.resolve()
    if recipe.source.gguf_file is not None:
        resolve_inside(tmp_path / "model", recipe.source.gguf_file, "source.gguf_file")
    if recipe.ollama is not None:
        assert recipe.ollama.name is None or MODEL_NAME_RE.fullmatch(recipe.ollama.name)
        assert recipe.ollama.host is None or is_loopback(recipe.ollama.host)


def _refusal_is_one_line(exc: UserError) -> None:
    assert "\n" not in str(exc) and str(exc).strip(), repr(exc)


@pytest.fixture(scope="module")
def warm():
    load_recipe  # the loader and pydantic are imported; the canaries are not
    assert not [m for m in CANARY_MODULES if m in sys.modules]


@FUZZ
@given(edits=st.lists(st.tuples(st.sampled_from(KEYS), values), max_size=4),
       tag=st.one_of(st.none(), st.sampled_from(TAGS)),
       overrides=st.lists(st.tuples(st.sampled_from(KEYS + ["prune.remvoe", "a..b", ".x", "x."]),
                                    st.one_of(st.sampled_from(HOSTILE + TAGS), st.text(max_size=15))),
                          max_size=3))
def test_any_recipe_and_overrides_load_or_are_refused_in_one_line(tmp_path, warm, edits, tag, overrides):
    marker = tmp_path / "MARKER"
    path = tmp_path / "r.yaml"
    path.write_text(_text_with(marker, edits, tag), encoding="utf-8")
    items = [f"{key}={value.replace('MARK', str(marker))}" for key, value in overrides]
    try:
        recipe = load_recipe(str(path), items)
    except UserError as exc:
        _refusal_is_one_line(exc)
    else:
        _check_accepted(recipe, tmp_path)
    assert not marker.exists()
    assert not [m for m in CANARY_MODULES if m in sys.modules]


# ---------------------------------------------------------------- YAML bombs
def _laughs(levels: int = 9, fan: int = 10) -> str:
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * fan)}]")
    return "recipe_version: 1\nname: bomb\nsource: {model: /x}\n" + "\n".join(lines) + f"\nprune: {{layers: *a{levels - 1}}}\n"


@pytest.mark.parametrize("text, words", [
    (_laughs(), "aliases"),
    ("x: " + "[" * 5000 + "]" * 5000 + "\n", "nested"),
    ("x: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n", "nested"),
    ("x: " + "a" * (2 << 20) + "\n", "too big"),
])
def test_yaml_bombs_are_refused_fast(text, words):
    started = time.perf_counter()
    with pytest.raises(UserError, match=words) as info:
        parse_yaml(text, "bomb.yaml")
    _refusal_is_one_line(info.value)
    print(f"refused in {time.perf_counter() - started:.3f}s")  # bench/RESULTS.md has the figures


def test_big_recipe_file_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "big.yaml"
    with open(path, "wb") as f:
        f.truncate(3 << 30)  # 3 GiB, sparse: reading it would take the machine's memory
    with pytest.raises(UserError, match="too big for a recipe"):
        load_recipe(str(path))


def test_a_few_aliases_still_work():
    text = "recipe_version: 1\nname: ok\nsource: {model: /x}\nollama: {parameters: {stop: &s [a, b], x: *s}}\n"
    assert parse_yaml(text, "ok.yaml")["ollama"]["parameters"]["x"] == ["a", "b"]


def test_yaml_bomb_through_the_cli_is_one_line_exit_2(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(_laughs())
    proc = cli("run", path, "--out", tmp_path / "out", "--dry-run")
    assert_clean_error(proc, "aliases")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- paths and trust in recipes
@pytest.mark.parametrize("edit, words", [
    (("source.gguf_file", "../../elsewhere/model.gguf"), "inside the model directory"),
    (("source.gguf_file", "/etc/model.gguf"), "inside the model directory"),
    (("name", "../escape"), "name"),
    (("name", "a" * 81), "name"),
    (("ollama.system", "hi\0there"), "NUL"),
    (("ollama.host", "http://evil.example:11434"), "not this machine"),
    (("ollama.host", "10.1.2.3"), "not this machine"),
    (("source.trust_remote_code", True), "pass --trust-remote-code"),
])
def test_recipe_paths_hosts_and_trust_are_checked(tmp_path, edit, words):
    path = tmp_path / "r.yaml"
    path.write_text(_text_with(tmp_path / "m", [edit], None))
    with pytest.raises(UserError, match=words):
        load_recipe(str(path))


@pytest.mark.parametrize("host", [None, "127.0.0.1:11500", "http://localhost:11434", "[::1]:11434"])
def test_local_hosts_are_fine_in_a_recipe(tmp_path, host):
    path = tmp_path / "r.yaml"
    path.write_text(_text_with(tmp_path / "m", [("ollama.host", host)], None))
    assert load_recipe(str(path)).ollama.host == host


# ---------------------------------------------------------------- Ollama names: one rule
# From Ollama's types/model/name.go: [host/][namespace/]model[:tag]; parts start with a letter,
# digit or '_'; '-', '_', '.' after that ('.' not in a namespace; ':' only in the host);
# host <= 350 bytes, namespace/model/tag <= 80.
VALID_NAMES = ["m", "smollm2-pruned", "smollm2-pruned:Q4_K_M", "library/llama3:8b", "_private", "a.b.c",
               "registry.ollama.ai/library/llama3:latest", "localhost:5000/ns/m:t", "My_Model-1.0:v1.2_x",
               "m" * 80, "m:" + "t" * 80]
INVALID_NAMES = ["", "-m", ".m", "m:", ":t", "m::t", "m:t:u", "ns.x/m", "h/ns/m/x", "a b", "m/", "/m",
                 "m:-t", "m:.t", "../x", "a\nb", "é", "m" * 81, "m:" + "t" * 81, "m+Q4_0", "m@sha256-1"]


@pytest.mark.parametrize("name", VALID_NAMES)
def test_names_ollama_accepts(name):
    assert check_ollama_name(name) == name


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_names_ollama_refuses(name):
    with pytest.raises(UserError, match="not a valid Ollama model name"):
        check_ollama_name(name)


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(st.text(alphabet="ab9_.-:/ +", max_size=12))
def test_recipe_and_registration_use_the_same_name_rule(name):
    from ollama_compress.hooks.registration import check_model_name
    from ollama_compress.recipe import Ollama

    def accepts(check) -> bool:
        try:
            check(name)
            return True
        except (UserError, ValueError):
            return False

    assert accepts(check_model_name) == accepts(lambda n: Ollama(name=n))
