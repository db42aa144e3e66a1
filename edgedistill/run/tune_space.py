"""A search space for ``edgedistill tune``: recipe keys and the values a study may give them, checked like a recipe.

    # space.yaml: dotted recipe keys
    distill.temperature: {low: 1, high: 10, log: true}
    distill.alpha: {low: 0.1, high: 0.9}
    student.lr: {low: 1.0e-4, high: 1.0e-2, log: true}
    student.epochs: {low: 4, high: 12, step: 4}          # a whole-number key: whole numbers
    distill.method: {choices: [kd, dkd]}
    student.model: {choices: [mobilenetv3_small_050, lcnet_050]}

A range is whole numbers when the recipe's value at that key is (``student.epochs``), else real numbers; ``log``
samples on a log scale; ``step`` makes it a grid. Every key is checked against the recipe as ``--set`` would be (an
unknown key is refused naming the closest valid one) with each end of its range and each choice, so no trial fails
on a value the recipe refuses. A study tunes the student's training against one teacher trained once: keys that
would change the teacher, the data split or what the run is judged on are refused, saying so.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional, Union

from pydantic import Field, ValidationError, model_validator

from edgedistill.errors import RecipeError
from edgedistill.recipe.loading import explain_error, safe_yaml
from edgedistill.recipe.schema import Recipe
from edgedistill.recipe.sections import Strict

# What a trial may change: the student's own training. data.* only where it acts at training time.
ALLOWED = ("student.", "distill.", "train.", "data.augment.", "data.sampler", "data.batch_size")
WHY = {
    "teacher.": "the teacher is trained once for the whole study",
    "data.": "the data is loaded once for the whole study (data.augment, data.sampler and data.batch_size may vary)",
    "evaluate.": "every trial is judged on the same metric",
    "seed": "a trial's seed is the study's: vary it with --set seed=N on another study",
}


class Range(Strict):
    """Numbers between ``low`` and ``high`` (both included), on a log scale with ``log``, a grid with ``step``."""

    low: float
    high: float
    log: bool = False
    step: Optional[float] = Field(None, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> "Range":
        if not self.low < self.high:
            raise ValueError(f"low ({self.low:g}) must be below high ({self.high:g})")
        if self.log and self.low <= 0:
            raise ValueError("log: true needs low > 0")
        if self.log and self.step is not None:
            raise ValueError("log and step do not go together (Optuna samples a log range continuously)")
        return self


class Choices(Strict):
    """One of the listed values."""

    choices: list[Union[str, int, float, bool, None]] = Field(min_length=1)


Dimension = Union[Range, Choices]


class SearchSpace:
    """Validated dimensions, in file order; ``integer[key]`` when the recipe's value at ``key`` is whole."""

    def __init__(self, dims: dict[str, Dimension], integer: dict[str, bool], source: str):
        self.dims, self.integer, self.source = dims, integer, source

    def fingerprint(self) -> str:
        data = {k: d.model_dump() for k, d in self.dims.items()}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def suggest(self, trial) -> dict[str, Any]:
        """This trial's values (Optuna's ``suggest_*``)."""
        values: dict[str, Any] = {}
        for key, dim in self.dims.items():
            if isinstance(dim, Choices):
                values[key] = trial.suggest_categorical(key, dim.choices)
            elif self.integer[key]:
                step = int(dim.step) if dim.step else 1
                values[key] = trial.suggest_int(key, int(dim.low), int(dim.high), step=step, log=dim.log)
            else:
                values[key] = trial.suggest_float(key, dim.low, dim.high, step=dim.step, log=dim.log)
        return values

    def grid(self) -> dict[str, list]:
        """Every dimension as a list of values, for a grid search (ranges need a ``step``)."""
        out: dict[str, list] = {}
        for key, dim in self.dims.items():
            if isinstance(dim, Choices):
                out[key] = list(dim.choices)
                continue
            if dim.step is None:
                raise RecipeError(
                    f"{self.source}: {key}: a grid needs a step for every range (or choices): add step: N"
                )
            n = int(round((dim.high - dim.low) / dim.step)) + 1
            values = [dim.low + i * dim.step for i in range(n) if dim.low + i * dim.step <= dim.high + 1e-12]
            out[key] = [int(round(v)) for v in values] if self.integer[key] else [round(v, 12) for v in values]
        return out


def with_values(raw: dict, values: dict[str, Any]) -> dict:
    """``raw`` (a recipe as plain data) with dotted keys set."""
    out = json.loads(json.dumps(raw))
    for dotted, value in values.items():
        node = out
        parts = dotted.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[parts[-1]] = value
    return out


def trial_recipe(base: Recipe, values: dict[str, Any], source: str = "the search space") -> Recipe:
    """The base recipe with a trial's values."""
    try:
        return Recipe.model_validate(with_values(base.model_dump(mode="json"), values))
    except ValidationError as exc:
        raise RecipeError(explain_error(exc, f"with {source}'s values {values}")) from None


def _value_at(raw: dict, dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _check_allowed(key: str, source: str) -> None:
    if any(key == a or key.startswith(a) for a in ALLOWED):
        return
    why = next((text for prefix, text in WHY.items() if key == prefix or key.startswith(prefix)), None)
    raise RecipeError(
        f"{source}: '{key}' cannot be searched: "
        + (why or "a study searches the student's training (keys under student., distill., train.)")
    )


def load_space(path: str | Path, base: Recipe) -> SearchSpace:
    """The space in ``path``, each key checked against ``base`` (RecipeError naming the file and key)."""
    path = Path(path)
    source = f"search space '{path}'"
    if not path.is_file():
        raise RecipeError(f"{source} does not exist")
    raw = safe_yaml(path.read_text())
    if not isinstance(raw, dict) or not raw:
        raise RecipeError(
            f"{source}: write one dotted recipe key per line, e.g. 'distill.alpha: {{low: 0.1, high: 0.9}}'"
        )
    recipe_raw = base.model_dump(mode="json")
    dims: dict[str, Dimension] = {}
    integer: dict[str, bool] = {}
    for key, spec in raw.items():
        key = str(key)
        if not isinstance(spec, dict):
            raise RecipeError(f"{source}: {key}: give {{low: A, high: B}} or {{choices: [...]}}, not {spec!r}")
        try:
            dim: Dimension = Choices.model_validate(spec) if "choices" in spec else Range.model_validate(spec)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or key}: {e['msg']}" for e in exc.errors(include_url=False)
            )
            raise RecipeError(f"{source}: {key}: {problems}") from None
        current = _value_at(recipe_raw, key)
        whole = isinstance(current, int) and not isinstance(current, bool)
        if isinstance(dim, Range) and whole and (dim.low != int(dim.low) or dim.high != int(dim.high)):
            raise RecipeError(f"{source}: {key} takes whole numbers (the recipe has {current}): give whole low/high")
        samples = dim.choices if isinstance(dim, Choices) else [dim.low, dim.high]
        for sample in samples:  # the recipe's own check: unknown keys name the closest one, bad values say why
            value = int(sample) if whole and isinstance(sample, float) else sample
            trial_recipe(base, {key: value}, source)
        _check_allowed(key, source)
        dims[key], integer[key] = dim, whole
    return SearchSpace(dims, integer, str(path))
