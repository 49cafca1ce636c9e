"""Recipes: the schema, safe YAML, --set overrides and `validate` on shipped and hostile recipes."""
from __future__ import annotations

import json

import pytest
import yaml

from helpers import assert_clean_error, cli
from ollama_compress.errors import UserError
from ollama_compress.recipe import RecipeError, apply_override, load_recipe, shipped_recipes

GOOD = """\
recipe_version: 1
name: tiny
source: {model: /nowhere}
prune: {remove: 2}
export: {quants: [Q8_0]}
"""


def write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_every_shipped_recipe_validates_and_says_how_to_run_it():
    recipes = shipped_recipes()
    assert "smollm2-135m-demo" in recipes
    for name, path in recipes.items():
        text = path.read_text()
        assert text.startswith("#"), name
        assert "# Run: ollama-compress run" in text, name
        proc = cli("validate", str(path))
        assert proc.returncode == 0, proc.stderr
        assert "valid" in proc.stdout


@pytest.mark.parametrize(
    "text, needle",
    [
        (GOOD + "colour: red\n", "colour: unknown key"),
        (GOOD.replace("remove: 2", "remove: two"), "prune.remove: Input should be a valid integer"),
        (GOOD.replace("recipe_version: 1\n", ""), "recipe_version: missing"),
        (GOOD.replace("recipe_version: 1", "recipe_version: 7"), "recipe_version: version 7 is not supported"),
        (GOOD + "evil: !!python/object/apply:os.system ['true']\n", "not valid recipe YAML"),
        (GOOD.replace("{model: /nowhere}", "{model: /nowhere, trust_remote_code: true}"),
         "source.trust_remote_code: not allowed in a recipe; pass --trust-remote-code"),
        (GOOD.replace("remove: 2", "remove: 2, metric: my_pkg.metrics.fancy"), "not a capability name"),
        (GOOD.replace("Q8_0", "Q9_X"), "export.quants: unknown quant 'Q9_X'"),
        (GOOD.replace("remove: 2", "remove: 2, keep: 3"), "give exactly one of remove, keep, layers or target"),
    ],
)
def test_validate_reports_each_bad_recipe_with_its_location(tmp_path, text, needle):
    proc = cli("validate", write(tmp_path, text))
    assert_clean_error(proc, needle)
    assert proc.stdout == ""


def test_validate_reports_every_error_not_just_the_first(tmp_path):
    text = GOOD.replace("remove: 2", "remove: -1") + "extra: 1\n"
    proc = cli("validate", write(tmp_path, text))
    assert_clean_error(proc, "prune.remove", "extra: unknown key")


def test_python_tags_never_run(tmp_path):
    marker = tmp_path / "ran"
    text = GOOD + f"x: !!python/object/apply:os.system ['touch {marker}']\n"
    with pytest.raises(RecipeError):
        load_recipe(str(write(tmp_path, text)))
    assert not marker.exists()


def test_set_overrides_parse_values_as_yaml(tmp_path):
    path = write(tmp_path, GOOD)
    recipe = load_recipe(str(path), ["prune.remove=5", "ollama.parameters.num_ctx=4096", "export.quants=[Q4_K_M, Q8_0]"])
    assert recipe.prune.remove == 5
    assert recipe.ollama.parameters == {"num_ctx": 4096}
    assert recipe.export.quants == ["Q4_K_M", "Q8_0"]


@pytest.mark.parametrize("item, needle", [
    ("prune.remvoe=3", "--set prune.remvoe: no such recipe key"),
    ("nosuch=1", "--set nosuch: no such recipe key"),
    ("prune.remove.deeper=1", "is a value, not a section"),
    ("prune.remove", "expected key.path=value"),
])
def test_set_on_a_key_that_does_not_exist_is_refused(item, needle):
    with pytest.raises(UserError, match=needle.replace(".", r"\.").replace("[", r"\[")):
        apply_override(yaml.safe_load(GOOD), item)


def test_cli_set_bad_key_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    proc = cli("run", write(tmp_path, GOOD), "--set", "prune.remvoe=3", "--out", out)
    assert_clean_error(proc, "no such recipe key")
    assert not out.exists()


def test_run_with_missing_source_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    proc = cli("run", write(tmp_path, GOOD), "--out", out)
    assert_clean_error(proc, "/nowhere does not exist")
    assert not out.exists()


def test_recipes_show_prints_the_shipped_file():
    proc = cli("recipes", "show", "smollm2-135m-demo")
    assert proc.returncode == 0
    assert yaml.safe_load(proc.stdout)["name"] == "smollm2-135m-demo"


def test_plugins_lists_builtins_with_their_hooks_as_json():
    proc = cli("plugins")
    assert proc.returncode == 0, proc.stderr
    plugins = {p["name"]: p for p in json.loads(proc.stdout)}
    for name, hook in [("source", "load_source"), ("importance", "score_layers"), ("prune", "prune_layers"),
                       ("export", "export_gguf"), ("quantize", "quantize_gguf"), ("stages", "run_stage")]:
        assert hook in plugins[name]["hooks"], (name, plugins.get(name))
        assert plugins[name]["builtin"] is True
        assert plugins[name]["version"]
