"""Loading a recipe: YAML without aliases, dotted ``--set`` overrides, and errors that name the key, the file and the
closest valid key.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ValidationError

from edgedistill.errors import RecipeError
from edgedistill.recipe.schema import Recipe


def _find_model(annotation: Any) -> Optional[type[BaseModel]]:
    """The model class inside an annotation: X, Optional[X], list[X], Union[Literal[...], list[X]]."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _find_model(arg)
        if found is not None:
            return found
    return None


def _model_at(path: tuple, model: type[BaseModel] = Recipe) -> Optional[type[BaseModel]]:
    """The pydantic model class found at a dotted location, if any."""
    current: Any = model
    for part in path:
        if isinstance(part, int):  # an item of a list: its model is the list's
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        current = _find_model(field.annotation) or field.annotation
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _is_union_tag(part: Any) -> bool:
    return isinstance(part, str) and "[" in part  # pydantic names union branches "list[X]", "literal['a']"


def _deepest_union_branch(errors: list[dict]) -> list[dict]:
    """Of the errors of a union field (one per branch tried), keep those of the branch that got furthest:
    a typo inside a list of pairs is reported there, not as "input should be 'none', 'auto' or 'last'"."""
    depth: dict[tuple, int] = {}
    for e in errors:
        tags = [i for i, p in enumerate(e["loc"]) if _is_union_tag(p)]
        if tags:
            field = tuple(e["loc"][: tags[0]])
            depth[field] = max(depth.get(field, 0), len(e["loc"]))
    kept = []
    for e in errors:
        tags = [i for i, p in enumerate(e["loc"]) if _is_union_tag(p)]
        if not tags or len(e["loc"]) == depth[tuple(e["loc"][: tags[0]])]:
            kept.append(e)
    return kept


def explain_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid recipe {source}:"]
    for e in _deepest_union_branch(err.errors()):
        loc = tuple(p for p in e["loc"] if not _is_union_tag(p))
        key = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            parent = _model_at(loc[:-1])
            known = list(parent.model_fields) if parent else []
            close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.5)
            prefix = ".".join(str(p) for p in loc[:-1])
            hint = f"; did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else ""
            lines.append(f"  unknown key '{key}'{hint} (valid here: {', '.join(known)})")
        else:
            lines.append(f"  {key or '<top>'}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


class _NoAliasLoader(yaml.SafeLoader):
    """yaml.safe_load without aliases: ``*name`` references let a few hundred bytes expand into millions of nodes
    (a "billion laughs"), and nothing in a recipe needs them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            event = self.peek_event()
            raise RecipeError(
                f"YAML alias '*{event.anchor}' at line {event.start_mark.line + 1}: recipes do not take "
                "aliases (they can expand a few bytes into millions of values); write the value out"
            )
        return super().compose_node(parent, index)


def safe_yaml(text: str) -> Any:
    """``yaml.safe_load`` that refuses aliases (RecipeError naming the line)."""
    return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 (a SafeLoader subclass)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise RecipeError(f"--set expects key=value, got '{text}' (for example --set data.batch_size=32)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"--set has an empty key in '{text}'")
    try:
        value = safe_yaml(raw) if raw.strip() else None
    except RecipeError as exc:
        raise RecipeError(f"--set {key}: {exc}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"--set {key}: value '{raw}' is not valid YAML: {exc}") from exc
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"--set {'.'.join(path)}: '{'.'.join(path[: i + 1])}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return raw


def load_recipe(path: str | Path, overrides: Optional[list[str]] = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file '{path}' does not exist")
    try:
        raw = safe_yaml(path.read_text()) or {}
    except RecipeError as exc:
        raise RecipeError(f"recipe '{path}': {exc}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe '{path}' is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe '{path}' must be a mapping of keys, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides or [])
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(explain_error(exc, f"'{path}'")) from None
