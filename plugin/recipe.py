"""Recipe schema: one strict pydantic tree, loaded from YAML with ``yaml.safe_load`` only.

Recipes are data. They name capabilities (metrics, losses, data sources) by short names that
installed plugins registered; they can't name code, and can't turn on ``trust_remote_code``.
"""
from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import UserError

SUPPORTED_RECIPE_VERSIONS = (1,)
NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")  # capability names: no dots, so never an import path
MODEL_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]*(:[a-zA-Z0-9._-]+)?$")

QUANT_TYPES = (
    "F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_0", "Q5_1", "Q4_K_M", "Q4_K_S",
    "Q4_0", "Q4_1", "IQ4_XS", "IQ4_NL", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K", "Q2_K_S",
    "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ1_S", "IQ1_M",
)


def _capability_name(value: str) -> str:
    if not NAME_RE.match(value):
        raise ValueError(f"'{value}' is not a capability name (lowercase letters, digits, '_'; no dots)")
    return value


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Source(Strict):
    model: str  # HF directory, hub id, path to a .gguf file, or scheme:name (embedded:smollm2-135m-instruct)
    revision: str | None = None  # hub revision (branch, tag or commit)
    gguf_file: str | None = None  # GGUF file name inside model, when model is a directory or hub id
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # weights dtype while compressing


class TextSource(Strict):
    from_: str = Field("default", alias="from")  # default | text | jsonl | hf | teacher | a plugin's kind
    path: str | None = None  # file for text/jsonl
    dataset: str | None = None  # HF dataset name for `hf` (needs the datasets package and a network)
    split: str = "train"
    prompts: list[str] | None = None  # seed prompts for `teacher` (default: a built-in set)
    samples: int = Field(32, ge=1, le=100_000)  # number of sequences
    seq_len: int = Field(256, ge=8, le=131_072)  # tokens per sequence
    seed: int = 0

    _kind = field_validator("from_")(classmethod(lambda cls, v: _capability_name(v)))


class Data(Strict):
    calibration: TextSource = TextSource()
    heldout: TextSource = TextSource(split="heldout", samples=16)
    # heal text: one source or a list whose texts are joined (e.g. the shipped corpus plus teacher-written chat)
    heal: Union[TextSource, list[TextSource]] = TextSource()

    @field_validator("heal")
    @classmethod
    def _some_heal_source(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("give at least one heal text source")
        return value

    def heal_sources(self) -> list[TextSource]:
        return self.heal if isinstance(self.heal, list) else [self.heal]


Protect = Union[Literal["first", "last"], int]


class Prune(Strict):
    metric: str = "block_influence"  # which score chooses the layers
    report_metrics: list[str] = []  # further metrics to compute and plot, not used for choosing
    remove: int | None = Field(None, ge=0)  # how many layers to remove
    keep: int | None = Field(None, ge=1)  # or: how many layers to keep
    layers: list[int] | None = None  # or: exactly these 0-based layers
    block: bool = False  # remove one contiguous block (angular distance)
    protect: list[Protect] = ["first", "last"]  # layers never removed
    iterative: bool = False  # remove one layer, rescore, repeat

    _metric = field_validator("metric")(classmethod(lambda cls, v: _capability_name(v)))

    @field_validator("report_metrics")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        return [_capability_name(v) for v in value]

    @model_validator(mode="after")
    def _one_selection(self) -> "Prune":
        given = [k for k in ("remove", "keep", "layers") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of remove, keep or layers")
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            raise ValueError("layers has duplicate indices")
        return self


class Heal(Strict):
    teacher: str | None = None  # default: the source model
    steps: int = Field(60, gt=0)  # optimizer steps
    lr: float = Field(2e-4, gt=0)  # peak learning rate (AdamW)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # decay after warmup (to 10% for cosine/linear)
    warmup: int | None = Field(None, ge=0)  # warmup steps (default: 5% of steps)
    batch_size: int = Field(4, gt=0)  # sequences per optimizer step
    micro_batch: int | None = Field(None, gt=0)  # sequences per forward pass (default: batch_size)
    seq_len: int = Field(256, gt=0)  # tokens per sequence
    temperature: float = Field(2.0, gt=0)  # softens logits for the KL term
    loss: dict[str, float] = {"kl": 1.0, "hidden_mse": 1.0}  # registered loss name -> weight
    hidden_layers: Union[Literal["all"], list[int]] = "all"  # student layers matched by hidden_mse
    train: Literal["all", "neighbours", "lora"] = "all"  # all decoder layers; layers next to a cut; LoRA (peft)
    lora_rank: int = Field(16, gt=0)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # autocast; auto: bf16 on CUDA and on CPUs with bf16
    gradient_checkpointing: bool | None = None  # default: on for CUDA, off elsewhere
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0)  # 0: off
    checkpoint_every: int = Field(20, ge=0)  # steps between checkpoints (0: none)
    iterative_steps: int = Field(20, ge=0)  # with prune.iterative: heal steps after each removal (0: none)
    seed: int = 0

    @field_validator("seq_len")
    @classmethod
    def _long_enough(cls, value: int) -> int:
        if value < 8:
            raise ValueError(f"seq_len {value} is too short; use at least 8 tokens")
        return value

    @field_validator("loss")
    @classmethod
    def _loss_names(cls, value: dict[str, float]) -> dict[str, float]:
        for name, weight in value.items():
            _capability_name(name)
            if weight < 0:
                raise ValueError(f"loss weight of '{name}' is negative; use 0 to turn it off")
        if not any(w > 0 for w in value.values()):
            raise ValueError("every loss weight is 0; give at least one loss a positive weight")
        from .plugins import capabilities

        known = capabilities("losses")
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ValueError(f"unknown loss '{unknown[0]}'; known: {', '.join(sorted(known)) or 'none'}")
        return value


class Export(Strict):
    outtype: Literal["F32", "F16", "BF16"] = "F16"  # the unquantized GGUF written first
    quants: list[str] = ["Q4_K_M"]  # llama.cpp quant names
    imatrix: str | None = None  # importance-matrix file for IQ/low-bit quants

    @field_validator("quants")
    @classmethod
    def _known_quants(cls, value: list[str]) -> list[str]:
        for q in value:
            if q not in QUANT_TYPES:
                raise ValueError(f"unknown quant '{q}'; known: {', '.join(QUANT_TYPES)}")
        return value


class Ollama(Strict):
    name: str | None = None  # model name in Ollama (default: the recipe name)
    register_: bool = Field(True, alias="register")  # create the model in Ollama (needs a running server)
    host: str | None = None  # default: OLLAMA_HOST or http://127.0.0.1:11434
    system: str | None = None  # SYSTEM prompt
    template: str | None = None  # chat family (chatml, llama3, ...); default: matched from the HF template
    parameters: dict[str, Union[int, float, str, list[str]]] = {}  # Modelfile PARAMETERs

    @field_validator("name")
    @classmethod
    def _model_name(cls, value: str | None) -> str | None:
        if value is not None and not MODEL_NAME_RE.match(value):
            raise ValueError(f"'{value}' is not a valid Ollama model name")
        return value


class Recipe(Strict):
    recipe_version: int
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    description: str | None = None
    source: Source
    data: Data = Data()
    prune: Prune | None = None  # omit a section to skip its stage
    heal: Heal | None = None
    export: Export | None = None
    ollama: Ollama | None = None

    @field_validator("recipe_version")
    @classmethod
    def _supported(cls, value: int) -> int:
        if value not in SUPPORTED_RECIPE_VERSIONS:
            raise ValueError(f"version {value} is not supported; this ollama-compress reads {SUPPORTED_RECIPE_VERSIONS}")
        return value


# ---------------------------------------------------------------- loading
def _format_error(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "recipe"
    loc = loc.replace("from_", "from")
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        key = str(err["loc"][-1])
        if key == "trust_remote_code":
            return f"{loc}: not allowed in a recipe; pass --trust-remote-code on the command line"
        return f"{loc}: unknown key; remove it or check its spelling"
    if kind == "missing" and loc == "recipe_version":
        return f"recipe_version: missing; add 'recipe_version: {SUPPORTED_RECIPE_VERSIONS[-1]}' at the top"
    msg = msg.removeprefix("Value error, ")
    return f"{loc}: {msg}"


class RecipeError(UserError):
    """A recipe that does not validate; ``errors`` holds one located line per problem."""

    def __init__(self, source: str, errors: list[str]):
        self.source, self.errors = source, errors
        super().__init__(f"{source}: " + "; ".join(errors))


def parse_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(source, [f"not valid recipe YAML{where}: {problem}"]) from None
    if not isinstance(data, dict):
        raise RecipeError(source, ["a recipe is a YAML mapping of keys to values"])
    return data


def validate(data: dict[str, Any], source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(source, [_format_error(e) for e in exc.errors()]) from None


def shipped_recipes() -> dict[str, Path]:
    """Recipes that ship with the package, by name (file stem)."""
    root = resources.files("ollama_compress.recipes")
    return {p.name.removesuffix(".yaml"): Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def resolve_recipe_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_recipes()
    if name_or_path in shipped:
        return shipped[name_or_path]
    if path.exists():
        raise UserError(f"{path} is not a file; give a recipe .yaml file")
    raise UserError(
        f"no recipe file or shipped recipe named '{name_or_path}'; see 'ollama-compress recipes list'"
    )


def load_recipe(name_or_path: str, overrides: list[str] = ()) -> Recipe:
    """Read, override (``key.path=value``) and validate a recipe file or shipped recipe name."""
    path = resolve_recipe_path(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read recipe {path}: {exc}") from None
    data = parse_yaml(text, str(path))
    for item in overrides:
        apply_override(data, item)
    return validate(data, str(path))


# ---------------------------------------------------------------- --set key.path=value
def _field_model(model: type[BaseModel], key: str) -> tuple[str, Any] | None:
    for name, info in model.model_fields.items():
        if key in (name, info.alias):
            return (info.alias or name), info.annotation
    return None


def _submodel(annotation: Any) -> type[BaseModel] | None:
    import typing

    candidates = [annotation, *typing.get_args(annotation)]
    for c in candidates:
        if isinstance(c, type) and issubclass(c, BaseModel):
            return c
    return None


def _is_mapping(annotation: Any) -> bool:
    import typing

    return typing.get_origin(annotation) is dict


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one ``key.path=value`` (value parsed as YAML) to raw recipe data, in place.

    The key path must name a field of the schema; keys inside free mappings
    (``ollama.parameters.num_ctx``, ``heal.loss.kl``) may be new.
    """
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected key.path=value")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not all(parts):
        raise UserError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    model: type[BaseModel] | None = Recipe
    node = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if model is None:  # inside a free mapping
            key_name = part
            sub_model, mapping = None, False
        else:
            found = _field_model(model, part)
            if found is None:
                where = ".".join(parts[: i + 1])
                raise UserError(f"--set {where}: no such recipe key; see 'ollama-compress recipes show' for the keys")
            key_name, annotation = found
            sub_model, mapping = _submodel(annotation), _is_mapping(annotation)
        if last:
            node[key_name] = value
            return
        if sub_model is None and not mapping:
            raise UserError(f"--set {'.'.join(parts[: i + 1])}: is a value, not a section")
        child = node.get(key_name)
        if not isinstance(child, dict):
            child = {}
            node[key_name] = child
        node, model = child, sub_model
