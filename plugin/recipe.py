"""Recipe schema: one strict pydantic tree, loaded from YAML with ``yaml.safe_load`` only.

Recipes are data. They name capabilities (metrics, losses, data sources) by short names that
installed plugins registered; they can't name code, and can't turn on ``trust_remote_code``.
"""
from __future__ import annotations

import math
import re
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import UserError
from .hosts import is_loopback
from .quant_names import NEEDS_IMATRIX, quant_name_problem

SUPPORTED_RECIPE_VERSIONS = (1,)
NAME_RE = re.compile(r"[a-z][a-z0-9_]*")  # capability names: no dots, so never an import path
# Ollama model names, as Ollama's own parser accepts them (types/model/name.go, isValidPart):
# [host/][namespace/]model[:tag]; every part starts with a letter, digit or '_'; a namespace has
# no '.', only a host may hold ':'; host up to 350 bytes, the other parts up to 80.
MODEL_NAME_RE = re.compile(
    r"(?:(?:[A-Za-z0-9_][A-Za-z0-9_.:-]{0,349}/)?[A-Za-z0-9_][A-Za-z0-9_-]{0,79}/)?"
    r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,79})?"
)


def _capability_name(value: str) -> str:
    if not NAME_RE.fullmatch(value):
        raise ValueError(f"'{value}' is not a capability name (lowercase letters, digits, '_'; no dots)")
    return value


def exactly_one(**given: Any) -> str | None:
    """The problem when not exactly one of ``given`` is set (not None): "give exactly one of remove, keep or layers"."""
    if sum(value is not None for value in given.values()) == 1:
        return None
    *first, last = given
    return f"give exactly one of {', '.join(first)} or {last}"


MAX_RECIPE_BYTES = 1 << 20  # a recipe is a page of YAML; anything near this is not one
MAX_YAML_ALIASES = 100  # anchors/aliases expand; a few are handy, thousands are a bomb
MAX_YAML_NODES = 100_000  # values with aliases expanded; a recipe has a few dozen
MAX_YAML_DEPTH = 64


def parse_count(text: str | int) -> int:
    """``100M``, ``1.5B``, ``250k`` or a plain number -> an int; UserError otherwise."""
    if isinstance(text, int):
        return text
    found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMbB]?)\s*", str(text))
    if not found:
        raise UserError(f"'{text}' is not a parameter count; write e.g. 100M or 1.5B")
    scale = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}[found.group(2).lower()]
    return int(float(found.group(1)) * scale)


def ollama_name_problem(name: str) -> str | None:
    """Why ``name`` is not a model name Ollama accepts, or None when it is."""
    if not isinstance(name, str) or not MODEL_NAME_RE.fullmatch(name):
        return (f"'{name}' is not a valid Ollama model name; use [namespace/]model[:tag] with letters, "
                "digits, '_', '-', '.' (each part starting with a letter, digit or '_'; at most 80 characters)")
    return None


def check_ollama_name(name: str) -> str:
    """``name`` if Ollama accepts it as a model name (with an optional ``:tag``), else a UserError."""
    problem = ollama_name_problem(name)
    if problem:
        raise UserError(problem)
    return name


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)  # .inf/.nan: refused


class Source(Strict):
    model: str  # HF directory, hub id, path to a .gguf file, or scheme:name (embedded:smollm2-135m-instruct)
    revision: str | None = None  # hub revision (branch, tag or commit)
    gguf_file: str | None = None  # GGUF file name inside model, when model is a directory or hub id
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # weights dtype while compressing

    @field_validator("gguf_file")
    @classmethod
    def _inside_model(cls, value: str | None) -> str | None:
        if value is not None and (not value or value.startswith(("/", "~", "\\")) or ".." in re.split(r"[/\\]", value)):
            raise ValueError(f"'{value}' must be a file name inside the model directory (no '..', not absolute)")
        return value


class TextSource(Strict):
    from_: str = Field("default", alias="from")  # default | text | jsonl | hf | teacher | a plugin's kind
    path: str | None = None  # file for text/jsonl
    dataset: str | None = None  # HF dataset name for `hf` (needs the datasets package and a network)
    split: str = "train"  # dataset split for `hf`
    prompts: list[str] | None = None  # prompts for `teacher` (default: `path`, JSON lines with `prompt`, or the shipped set)
    write: Literal["chat", "text"] = "chat"  # `teacher`: replies to the prompts, or text from its start token alone
    tokens: int | None = Field(None, ge=1, le=100_000_000)  # `teacher`: tokens of chat to write (default: from the heal)
    temperature: float = Field(0.7, ge=0, le=5)  # `teacher` sampling; 0: greedy
    top_p: float = Field(0.9, gt=0, le=1)  # `teacher` nucleus sampling
    max_new_tokens: int = Field(256, ge=1, le=4096)  # `teacher`: the longest reply
    samples: int = Field(32, ge=1, le=100_000)  # number of sequences
    seq_len: int = Field(256, ge=8, le=131_072)  # tokens per sequence
    seed: int = 0  # which sequences are drawn

    _kind = field_validator("from_")(classmethod(lambda cls, v: _capability_name(v)))


class Data(Strict):
    calibration: TextSource = TextSource()
    heldout: TextSource = TextSource(split="heldout", samples=16)
    # heal text: one source or a list whose texts are joined; by default the shipped corpus plus, in equal parts,
    # teacher-written chat and text the teacher writes from nothing, as much as keeps each heal window seen at
    # most twice (hooks/data.py, heal_chat_tokens)
    heal: Union[TextSource, list[TextSource]] = [
        TextSource(), TextSource.model_validate({"from": "teacher"}),
        TextSource.model_validate({"from": "teacher", "write": "text", "temperature": 1.0, "top_p": 0.95})]

    @field_validator("heal")
    @classmethod
    def _some_heal_source(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("give at least one heal text source")
        return value

    def heal_sources(self) -> list[TextSource]:
        return self.heal if isinstance(self.heal, list) else [self.heal]


Protect = Union[Literal["first", "last"], int]


class Target(Strict):
    """A size the pruned model must fit: the fewest layers are removed that reach it."""

    size_mb: float | None = Field(None, gt=0)  # GGUF file size at `quant`, in MiB
    params: Union[int, str, None] = None  # parameter count: 100M, 1.5B or a number
    quant: str = "Q4_K_M"  # the quant whose size counts

    @model_validator(mode="after")
    def _one_goal(self) -> "Target":
        if problem := exactly_one(size_mb=self.size_mb, params=self.params) or quant_name_problem(self.quant):
            raise ValueError(problem)
        if self.params is not None:
            try:
                parse_count(self.params)
            except UserError as exc:
                raise ValueError(str(exc)) from None
        return self


class Prune(Strict):
    metric: str = "block_influence"  # which score chooses the layers
    report_metrics: list[str] = []  # further metrics to compute and plot, not used for choosing
    remove: int | None = Field(None, ge=0)  # how many layers to remove
    keep: int | None = Field(None, ge=1)  # or: how many layers to keep
    layers: list[int] | None = None  # or: exactly these 0-based layers
    target: Target | None = None  # or: the fewest layers that fit {size_mb, quant} or {params}
    block: bool = False  # remove one contiguous block (angular distance)
    protect: list[Protect] = ["first", "last"]  # layers never removed
    iterative: bool = False  # remove one layer, rescore, repeat
    repair: Literal["linear", "none"] = "linear"  # fit a linear map per cut into the layer before it (ReplaceMe)
    select: Literal["auto", "metric", "measured"] = "auto"  # measured: each span + metric pick by KL; auto: if cheap

    _metric = field_validator("metric")(classmethod(lambda cls, v: _capability_name(v)))

    @field_validator("report_metrics")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        return [_capability_name(v) for v in value]

    @model_validator(mode="after")
    def _one_selection(self) -> "Prune":
        if problem := exactly_one(remove=self.remove, keep=self.keep, layers=self.layers, target=self.target):
            raise ValueError(problem)
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            raise ValueError("layers has duplicate indices")
        return self


class HealBudget(Strict):
    minutes: float | None = Field(None, gt=0)  # training time incl. held-out evaluations, from the timed first steps
    tokens: int | None = Field(None, gt=0)  # training tokens: steps = ceil(tokens / (batch_size x seq_len))

    @model_validator(mode="after")
    def _one_kind(self) -> "HealBudget":
        if problem := exactly_one(minutes=self.minutes, tokens=self.tokens):
            raise ValueError(problem + ", e.g. budget: {minutes: 10}")
        return self


class Heal(Strict):
    teacher: str | None = None  # default: the source model
    steps: int = Field(60, gt=0)  # optimizer steps (ignored when budget is set)
    budget: HealBudget | None = None  # {minutes: N} or {tokens: N}: derive the steps on this machine
    lr: float = Field(2e-4, gt=0)  # peak learning rate (AdamW)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # decay after warmup (to 10% for cosine/linear)
    warmup: int | None = Field(None, ge=0)  # warmup steps (default: 5% of steps)
    batch_size: int = Field(4, gt=0)  # sequences per optimizer step
    micro_batch: int | None = Field(None, gt=0)  # sequences per forward pass (default: batch_size)
    seq_len: int = Field(256, gt=0)  # tokens per sequence
    temperature: float = Field(1.0, gt=0)  # softens logits for the KL term (1: the KL evaluate reports)
    loss: dict[str, float] = {"kl": 1.0, "hidden_mse": 1.0}  # registered loss name -> weight
    hidden_layers: Union[Literal["all"], list[int]] = "all"  # student layers matched by hidden_mse
    train: Literal["all", "neighbours", "lora"] = "all"  # all decoder layers; layers next to a cut; LoRA (peft)
    lora_rank: int = Field(16, gt=0)  # rank of the LoRA adapters (train: lora)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # autocast; auto: bf16 on CUDA, on a CPU the faster one by a matmul measurement
    gradient_checkpointing: bool | None = None  # default: on for CUDA, off elsewhere
    weight_decay: float = Field(0.0, ge=0)  # AdamW weight decay
    grad_clip: float = Field(1.0, ge=0)  # 0: off
    checkpoint_every: int = Field(20, ge=0)  # steps between checkpoints (0: none)
    eval_every: int | None = Field(None, ge=0)  # steps between held-out KL checks (default: ~10% of heal time; 0: none)
    patience: int = Field(3, ge=0)  # held-out checks without a better KL that stop the heal (0: never stop early)
    iterative_steps: int = Field(20, ge=0)  # with prune.iterative: heal steps after each removal (0: none)
    seed: int = 0  # batch order and initial state

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
        return value


class Export(Strict):
    outtype: Literal["F32", "F16", "BF16"] = "F16"  # the unquantized GGUF written first
    quants: list[str] = ["Q4_K_M"]  # llama.cpp quant names
    # importance matrix for the K and IQ quants: "auto" computes one from the calibration text
    # when a quant benefits, a path uses that file (GGUF or legacy .dat), null uses none
    imatrix: str | None = "auto"

    @field_validator("quants")
    @classmethod
    def _known_quants(cls, value: list[str]) -> list[str]:
        for q in value:
            if problem := quant_name_problem(q):
                raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _imatrix_for_quants_that_need_one(self) -> "Export":
        needy = [q for q in self.quants if q in NEEDS_IMATRIX]
        if needy and self.imatrix is None:
            raise ValueError(f"{', '.join(needy)} need an importance matrix: set imatrix to auto or a file")
        return self


class Ollama(Strict):
    name: str | None = None  # model name in Ollama (default: the recipe name)
    register_: bool = Field(True, alias="register")  # create the model in Ollama (needs a running server)
    host: str | None = None  # default: OLLAMA_HOST or http://127.0.0.1:11434
    system: str | None = None  # SYSTEM prompt
    template: str | None = None  # chat family (chatml, llama3, ...); default: matched from the HF template
    parameters: dict[str, Union[int, float, str, list[str]]] = {}  # Modelfile PARAMETERs

    @field_validator("host")
    @classmethod
    def _local_host(cls, value: str | None) -> str | None:
        try:
            local = value is None or is_loopback(value)
        except Exception:  # noqa: BLE001 - any unparsable host is refused below
            local = False
        if not local:
            raise ValueError(f"'{value}' is not this machine; a recipe may only name a local Ollama "
                             "(127.0.0.1, localhost); for another machine set OLLAMA_HOST or use 'register --host'")
        return value

    @field_validator("name")
    @classmethod
    def _model_name(cls, value: str | None) -> str | None:
        problem = ollama_name_problem(value) if value is not None else None
        if problem:
            raise ValueError(problem)
        return value


def _no_nul(value: Any, where: str = "recipe", inside: tuple[int, ...] = ()) -> None:
    """No NUL byte in any string, and no value that contains itself (a recursive YAML alias)."""
    if isinstance(value, str) and "\0" in value:
        raise ValueError(f"{where} holds a NUL byte")
    if isinstance(value, (dict, list)):
        if id(value) in inside:
            raise ValueError(f"{where} refers to itself (a recursive YAML alias); write the value out")
        inside = (*inside, id(value))
    if isinstance(value, dict):
        for k, v in value.items():
            _no_nul(k, where, inside)
            _no_nul(v, f"{k}", inside)
    elif isinstance(value, list):
        for v in value:
            _no_nul(v, where, inside)


class LmEval(Strict):
    tasks: list[str] = Field(min_length=1)  # lm-eval task names (its own, or defined in include_path)
    include_path: str | None = None  # a folder of lm-eval task YAML files (e.g. a task on a local JSONL file)
    num_fewshot: int | None = Field(None, ge=0)
    limit: int | None = Field(None, ge=1)  # at most this many documents per task
    batch_size: int = Field(1, ge=1)


class Evaluate(Strict):
    knowledge: bool = True  # the shipped multiple-choice check (ollama_compress/data/knowledge.jsonl)
    prompts: list[str] | None = None  # greedy answers to these prompts (default: a built-in set of 5)
    max_new_tokens: int = Field(48, ge=1, le=4096)  # per greedy answer
    speed: bool = True  # prompt and generation tokens/s in llama.cpp, for GGUF rows
    teacher_quants: list[str] = []  # also quantize the teacher to these; auto: the quants nearest each compressed file's size
    lm_eval: LmEval | None = None  # EleutherAI lm-eval on the HF rows (needs the lm-eval extra)

    @field_validator("teacher_quants", mode="before")
    @classmethod
    def _known_teacher_quants(cls, value: Any) -> Any:
        value = [value] if isinstance(value, str) else value
        for q in value if isinstance(value, list) else []:
            if problem := quant_name_problem(q, also=("auto",)):
                raise ValueError(problem)
        return value


class Recipe(Strict):
    recipe_version: int
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*\z", max_length=80)  # the run directory runs/<name>
    description: str | None = None
    source: Source
    data: Data = Data()
    prune: Prune | None = None  # omit a section to skip its stage
    heal: Heal | None = None
    export: Export | None = None
    ollama: Ollama | None = None
    evaluate: Evaluate | None = None  # measure every stage and quant against the teacher; report.md

    @model_validator(mode="before")
    @classmethod
    def _plain_text(cls, data: Any) -> Any:
        _no_nul(data)  # a NUL byte in a path or prompt is never meant
        return data

    @field_validator("recipe_version")
    @classmethod
    def _supported(cls, value: int) -> int:
        if value not in SUPPORTED_RECIPE_VERSIONS:
            raise ValueError(f"version {value} is not supported; this ollama-compress reads {SUPPORTED_RECIPE_VERSIONS}")
        return value


# ---------------------------------------------------------------- loading
def format_error(err: dict[str, Any]) -> str:
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


class _BoundedError(yaml.YAMLError):
    """Too many aliases or too deep: refused before anything is built from it."""


class BoundedSafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (plain data types only) that refuses alias bombs and deep nesting.

    Aliases share nodes, so a small document can stand for billions of values once anything walks
    it (validation, JSON, hashing). Each node's size with its aliases expanded is counted as it is
    composed; more than ``MAX_YAML_NODES`` is refused, as are more than ``MAX_YAML_ALIASES``
    aliases and nesting deeper than ``MAX_YAML_DEPTH``.
    """

    def __init__(self, stream):
        super().__init__(stream)
        self._aliases = 0
        self._depth = 0
        self._sizes: dict[int, int] = {}

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_YAML_ALIASES:
                raise _BoundedError(f"more than {MAX_YAML_ALIASES} aliases (*name); write the values out")
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise _BoundedError(f"nested more than {MAX_YAML_DEPTH} levels deep")
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        self._count(node)
        return node

    def _count(self, node) -> None:
        if id(node) in self._sizes:
            return
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        else:
            children = []
        size = 1 + sum(self._sizes.get(id(child), 1) for child in children)
        if size > MAX_YAML_NODES:
            raise _BoundedError(f"aliases expand to more than {MAX_YAML_NODES} values; write the values out")
        self._sizes[id(node)] = size


def safe_yaml(text: str) -> Any:
    """``text`` read as YAML with plain data types only, no alias bombs, bounded nesting."""
    return yaml.load(text, Loader=BoundedSafeLoader)  # noqa: S506 - a SafeLoader subclass


def parse_yaml(text: str, source: str) -> dict[str, Any]:
    if len(text) > MAX_RECIPE_BYTES:
        raise RecipeError(source, [f"{len(text)} characters is too big for a recipe (at most {MAX_RECIPE_BYTES})"])
    try:
        data = safe_yaml(text)
    except _BoundedError as exc:
        raise RecipeError(source, [f"not a plain recipe: {exc}"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or (str(exc).splitlines() or ["unreadable"])[0]
        raise RecipeError(source, [f"not valid recipe YAML{where}: {problem}"]) from None
    except (RecursionError, ValueError, OverflowError) as exc:
        raise RecipeError(source, [f"not valid recipe YAML: {type(exc).__name__}"]) from None
    if not isinstance(data, dict):
        raise RecipeError(source, ["a recipe is a YAML mapping of keys to values"])
    return data


def non_finite_numbers(data: Any) -> list[str]:
    """Where ``data`` (parsed YAML) holds NaN or an infinity, as dotted key paths (iterative walk)."""
    found: list[str] = []
    stack: list[tuple[str, Any]] = [("", data)]
    seen: set[int] = set()  # a container reached twice (YAML aliases) is walked once
    while stack:
        where, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            found.append(f"{where or '(top)'}: {value} is not a finite number; give a finite value")
        elif isinstance(value, (dict, list, tuple)):
            if id(value) in seen:
                continue
            seen.add(id(value))
        if isinstance(value, dict):
            stack.extend((f"{where}.{k}" if where else str(k), v) for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            stack.extend((f"{where}[{i}]", v) for i, v in enumerate(value))
    return sorted(found)


NameCheck = Callable[[Recipe], list[str]]
_name_checks: list[NameCheck] = []


def add_name_check(check: NameCheck) -> None:
    """Run ``check`` on every recipe that passes the schema; it returns located problems
    (``heal.loss: unknown loss 'x'; known: ...``). The plugin manager adds the check of the names
    plugins register (losses, metrics, data sources) when it loads, so the schema never imports it."""
    if check not in _name_checks:
        _name_checks.append(check)


def validate(data: dict[str, Any], source: str = "recipe") -> Recipe:
    problems = non_finite_numbers(data)
    if problems:
        raise RecipeError(source, problems)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(source, [format_error(e) for e in exc.errors()]) from None
    problems = [line for check in _name_checks for line in check(recipe)]
    if problems:
        raise RecipeError(source, problems)
    return recipe


def shipped_recipes() -> dict[str, Path]:
    """Recipes that ship with the package, by name (file stem)."""
    root = resources.files("ollama_compress.recipes")
    return {p.name.removesuffix(".yaml"): Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def resolve_recipe_path(name_or_path: str) -> Path:
    if "\0" in name_or_path:
        raise UserError(f"{name_or_path!r} holds a NUL byte; give a recipe file or shipped recipe name")
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
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise UserError(f"{path} is {path.stat().st_size} bytes, too big for a recipe (at most {MAX_RECIPE_BYTES})")
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
    candidates = [annotation, *typing.get_args(annotation)]
    for c in candidates:
        if isinstance(c, type) and issubclass(c, BaseModel):
            return c
    return None


def _is_mapping(annotation: Any) -> bool:
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
    if len(item) > MAX_RECIPE_BYTES or "\0" in item:
        raise UserError(f"--set {key[:60]}: value too long or holds a NUL byte")
    try:
        value = safe_yaml(raw) if raw.strip() else ""
    except _BoundedError as exc:
        raise UserError(f"--set {key}: {exc}") from None
    except (yaml.YAMLError, RecursionError, ValueError, OverflowError):
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
