"""Recipes: YAML files validated by pydantic, with every problem reported at once.

A recipe has shared settings (data, input size, seed, batch size, optimizer,
learning-rate schedule, transforms, extra models such as a teacher) and an ordered
list of named, typed steps. This module reads and validates the shared settings;
`runtime.run.plan` validates the steps against the step kinds (`runtime.steps`), so new
kinds plug in without touching either.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from compiler.errors import FileProblems, NcError, did_you_mean, shorten
from compiler.limits import NoAliasLoader, read_yaml


def _builtin_recipes() -> Path:
    """specs/recipes of a checkout, else the copy an installed wheel carries (package runtime._specs)."""
    checkout = Path(__file__).resolve().parent.parent / "specs" / "recipes"
    if checkout.is_dir():
        return checkout
    from importlib.resources import files

    return Path(str(files("runtime._specs") / "recipes"))


BUILTIN_RECIPES = _builtin_recipes()


_PLAIN = re.compile(r"[A-Za-z0-9_.-]+")


def plain_name(value: str, what: str) -> str:
    """A name that becomes part of a file path: letters, digits, `_`, `.`, `-`; never `.` or `..`."""
    if not isinstance(value, str) or not _PLAIN.fullmatch(value) or value in (".", ".."):
        raise ValueError(f"{what} {value!r} is used in file paths: use letters, digits, `_`, `.` and `-` only "
                         "(not `.` or `..`)")
    return value


def plain(what: str) -> AfterValidator:
    """A string field that becomes part of a file path: `Annotated[str, plain("the step's name")]`."""
    return AfterValidator(lambda value: plain_name(value, what))


class RecipeError(FileProblems):
    """Problems in a recipe (or its overrides), each naming its field."""


SEED_END = 2 ** 32  # seeds as NumPy's and Optuna's samplers take them; torch's stay in range


class Strict(BaseModel):
    """Every configuration section (recipes, steps, studies): unknown keys and non-finite numbers refused."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class OptimizerConfig(Strict):
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)  # sgd only
    nesterov: bool = False


class ScheduleConfig(Strict):
    name: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: int = Field(0, ge=0)
    step_size: int = Field(10, ge=1)   # step only
    gamma: float = Field(0.1, gt=0)    # step only


class DataConfig(Strict):
    """Where the images come from. `--data PATH` sets `path`; nothing at all means digits."""

    source: Literal["auto", "folder", "torchvision", "digits"] = "auto"
    path: str | None = None            # folder: ImageFolder (train/ val/) or food-11 (training/ validation/ testing/)
    name: str | None = None            # torchvision dataset class, e.g. CIFAR10
    root: str | None = None            # torchvision dataset root
    download: bool = False             # torchvision only; never in tests
    val_fraction: float = Field(0.2, gt=0, lt=1)  # for sources without a validation split
    limit_per_class: int | None = Field(None, ge=1)  # the first N of each class in every split: quick runs, tests
    on_bad_image: Literal["error", "skip"] = "error"
    allow_single_class: bool = False   # one class trains to accuracy 1.0 and means nothing: refused unless set
    batch_size: int = Field(64, ge=1)
    eval_batch_size: int = Field(256, ge=1)
    cache: bool = True                 # keep decoded folder images in a memory-mapped file (see runtime.data.cache)
    cache_dir: str | None = None       # default: $NCCOMPILE_CACHE_DIR, else ~/.cache/nccompile


class SpeedConfig(Strict):
    """How fast, not what: none of these change what is trained, only how it runs.
    `auto` picks per device (see runtime.train.speed): bf16 autocast on CUDA and fp32 on the CPU; channels_last on
    CUDA and on CPUs with oneDNN."""

    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    channels_last: Literal["auto"] | bool = "auto"
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = "off"  # reduce-overhead = CUDA graphs
    data_on_device: Literal["auto"] | bool = "auto"  # auto: when the uint8 images fit in half the free memory
    background_checkpoints: Literal["auto"] | bool = "auto"  # auto: on CUDA (the GPU trains while the file is written)
    cudnn_benchmark: Literal["auto"] | bool = "auto"  # auto: on CUDA (cuDNN times its kernels per input shape)
    cuda_graphs: Literal["auto"] | bool = "auto"  # auto: on CUDA unless `compile` is on (it makes its own graphs)

    @field_validator("compile", mode="before")
    @classmethod
    def _yaml_booleans(cls, v):  # YAML reads `off` / `on` as booleans
        return {False: "off", True: "default"}.get(v, v) if isinstance(v, bool) else v


class TransformsConfig(Strict):
    """torchvision.transforms.v2 pipelines, one mapping per transform, e.g. `{flip: 0.5}`."""

    train: list[dict[str, Any]] = []
    eval: list[dict[str, Any]] = []


class ModelRef(Strict):
    """A model besides the one given on the command line (e.g. the teacher)."""

    spec: str                           # spec file; relative paths resolve against the recipe's folder
    checkpoint: str | None = None       # nccompile or plain safetensors weights
    torchvision_weights: str | None = None  # e.g. IMAGENET1K_V1: downloaded and cached by torchvision
    torchvision_state: str | None = None  # a zoo spec: torchvision's state dict as .safetensors, on disk
    params: dict[str, bool | int | float] = {}  # the spec's parameters, typed as declared


class Recipe(Strict):
    name: Annotated[str, plain("the recipe name")]
    description: str = ""
    seed: int = Field(0, ge=0, lt=SEED_END)
    input: str | None = None            # CxHxW for training; default: the spec's
    data: DataConfig = DataConfig()
    transforms: TransformsConfig = TransformsConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    speed: SpeedConfig = SpeedConfig()
    models: dict[Annotated[str, plain("the model name")], ModelRef] = {}
    steps: list[Any]

    @field_validator("models")
    @classmethod
    def _no_student(cls, v):
        if "student" in v:
            raise ValueError("`student` is the spec given on the command line; name other models differently")
        return v


def find_recipe(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise NcError(f"no recipe file {path}")
        return path
    builtin = BUILTIN_RECIPES / f"{name_or_path}.yaml"
    if builtin.exists():
        return builtin
    names = sorted(p.stem for p in BUILTIN_RECIPES.glob("*.yaml"))
    hint = did_you_mean(name_or_path, names)
    raise NcError(f"no built-in recipe `{name_or_path}`" + (f"; {hint}" if hint else "")
                  + f" (built-in: {', '.join(names)}; or pass a .yaml path)")


def _parse_scalar(text: str):
    try:
        return yaml.load(text, Loader=NoAliasLoader)
    except yaml.YAMLError:
        return text


def yaml_float(number: float) -> str:
    """`number` as YAML 1.1 reads a float: with a dot, and a sign on any exponent (`1e9` is text to it)."""
    mantissa, _, exponent = repr(float(number)).partition("e")
    mantissa += "" if "." in mantissa else ".0"
    return mantissa + (f"e{'' if exponent[0] in '+-' else '+'}{exponent}" if exponent else "")


def apply_overrides(raw: dict, overrides: list[str], source: str) -> dict:
    """`--set a.b.c=value`: steps are addressed by name (`steps.distill.epochs=3`), list items by index."""
    problems = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            problems.append(f"--set expects KEY=VALUE, got `{item}`")
            continue
        parts = key.split(".")
        node = raw
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):  # steps: by name or index; other lists: by index
                match = [s for s in node if isinstance(s, dict) and s.get("name") == part]
                if not match and part.isdigit() and int(part) < len(node):
                    match = [node[int(part)]]
                if not match and parts[:i] == ["steps"]:
                    names = [s.get("name") for s in node if isinstance(s, dict)]
                    hint = did_you_mean(part, names)
                    problems.append(f"--set {key}: no step `{part}` (steps: {', '.join(map(str, names))})"
                                    + (f"; {hint}" if hint else ""))
                    break
                if not match:
                    problems.append(f"--set {key}: `{'.'.join(parts[:i])}` has no item `{part}` (it has "
                                    f"{len(node)}, addressed by index from 0)")
                    break
                node = match[0]
            else:
                node = node.setdefault(part, {})
                if not isinstance(node, (dict, list)):
                    problems.append(f"--set {key}: `{'.'.join(parts[:i + 1])}` is not a section")
                    break
        else:
            if isinstance(node, list):
                problems.append(f"--set {key}: `{'.'.join(parts[:-1])}` is a list; address a field of one "
                                f"of its items, e.g. steps.NAME.epochs=3")
                continue
            node[parts[-1]] = _parse_scalar(value)
    if problems:
        raise RecipeError(source, problems)
    return raw


def _loc(loc: tuple, raw: dict) -> str:
    out = []
    for part in loc:
        if isinstance(part, int) and out and out[-1] == "steps":
            steps = raw.get("steps") or []
            name = steps[part].get("name") if part < len(steps) and isinstance(steps[part], dict) else None
            out[-1] = f"steps[{part}]" + (f" ({name})" if name else "")
        else:
            out.append(str(part))
    return ".".join(out)


# pydantic names the member of a union that failed as a last location part: `literal['auto']`, `bool`, ...
_UNION_MEMBER = re.compile(r"^(bool|int|float|str|none|literal\[.*\]|[a-z-]+\[.*\]|function-[a-z-]+\[.*\])$")


def _merge_union_members(errors: list[dict]) -> list[dict]:
    """One error per value that matched no member of its union: `speed.channels_last` expects 'auto' or a
    boolean, said once, rather than one error per member at made-up locations."""
    groups: dict[tuple, list[dict]] = {}
    for e in errors:
        loc = tuple(e["loc"])
        if loc and isinstance(loc[-1], str) and _UNION_MEMBER.match(loc[-1]):
            groups.setdefault(loc[:-1], []).append(e)
    merged, done = [], set()
    for e in errors:
        loc = tuple(e["loc"])
        group = groups.get(loc[:-1]) if loc else None
        if group is None or len(group) < 2 or e not in group:
            merged.append(e)
        elif loc[:-1] not in done:
            done.add(loc[:-1])
            msgs = list(dict.fromkeys(g["msg"] for g in group))  # int's and float's "a finite number": once
            text = msgs[0] + "".join(" or " + m.removeprefix("Input should be ") for m in msgs[1:])
            merged.append({**group[0], "loc": loc[:-1], "msg": text, "type": "union"})
    return merged


def problems_of(err: ValidationError, raw: dict, model_cls, prefix: tuple = ()) -> list[str]:
    problems = []
    for e in _merge_union_members(err.errors()):
        loc = prefix + tuple(e["loc"])
        where = _loc(loc, raw)
        if e["type"] == "extra_forbidden":
            parent = model_cls
            for part in e["loc"][:-1]:
                fields = getattr(parent, "model_fields", {})
                field = fields.get(part) if isinstance(part, str) else None
                ann = getattr(field, "annotation", None) if field else None
                parent = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else parent
            known = list(getattr(parent, "model_fields", {}))
            hint = did_you_mean(str(e["loc"][-1]), known)
            problems.append(f"unknown key `{where}`" + (f"; {hint}" if hint else "")
                            + (f" (expected one of: {', '.join(known)})" if known else ""))
        elif e["type"] == "missing":
            problems.append(f"`{where}` is required")
        elif isinstance(e.get("input"), dict):  # a check of the whole section: its message says what is wrong
            problems.append(f"`{where}`: {e['msg'].removeprefix('Value error, ')}")
        else:
            problems.append(f"`{where}`: {e['msg']} (got {shorten(repr(e.get('input')), 200)})")
    return problems


def read_recipe(name_or_path: str, overrides: list[str] = ()) -> tuple[dict, Path]:
    """The recipe's YAML as a mapping, with `--set` overrides applied; not validated yet."""
    path = find_recipe(name_or_path)
    source = str(path)
    raw = read_yaml(path, "recipe file", "recipe_bytes", RecipeError)
    if not isinstance(raw, dict):
        raise RecipeError(source, ["a recipe must be a mapping with `name` and `steps`"])
    return apply_overrides(raw, list(overrides), source), path


def validate_recipe(raw: dict) -> tuple[Recipe | None, list[str]]:
    """The shared settings, validated (steps are validated by runtime.run.plan against the step kinds)."""
    try:
        return Recipe.model_validate(raw), []
    except ValidationError as err:
        return None, problems_of(err, raw, Recipe)
