"""One readable form of pydantic validation errors, for `flglm job submit` and the API's 422 body alike.

Each problem names its field (dotted path), says what is allowed and suggests the nearest field name or
value for a near miss (difflib): `model: unknown field; did you mean model_ref?`. Pydantic's own wording is
kept otherwise (clients match on it), without its links to errors.pydantic.dev.
"""

from __future__ import annotations

import difflib
import enum
import re
import types
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import AliasChoices, BaseModel

_TYPE_TAG = re.compile(r"^[a-z-]+\[.*\]$|^function-")  # union members in a loc: "literal['all-linear']"
_PATTERN_CHOICES = re.compile(r"^\^\(([\w|.-]+)\)\$$")
_QUOTED = re.compile(r"'([^']*)'")
MAX_LISTED = 40


def _members(annotation: Any) -> list[Any]:
    """The types an annotation may hold, Annotated and unions unwrapped."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _members(get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        return [member for arg in get_args(annotation) for member in _members(arg)]
    return [annotation]


def _model_of(annotation: Any) -> type[BaseModel] | None:
    for member in _members(annotation):
        if isinstance(member, type) and issubclass(member, BaseModel):
            return member
    return None


def field_names(model: type[BaseModel]) -> dict[str, Any]:
    """A model's accepted keys (names and aliases) with their annotations."""
    names: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        names[name] = info.annotation
        aliases: list[Any] = [info.alias]
        if isinstance(info.validation_alias, AliasChoices):
            aliases += info.validation_alias.choices
        elif isinstance(info.validation_alias, str):
            aliases.append(info.validation_alias)
        names.update({alias: info.annotation for alias in aliases if isinstance(alias, str)})
    return names


def _descend(annotation: Any, part: str | int) -> Any:
    for member in _members(annotation):
        if isinstance(member, type) and issubclass(member, BaseModel):
            fields = field_names(member)
            if part in fields:
                return fields[part]
        origin = get_origin(member)
        if origin in (list, set, frozenset) and isinstance(part, int):
            return get_args(member)[0]
        if origin is tuple and isinstance(part, int) and get_args(member):
            return get_args(member)[min(part, len(get_args(member)) - 1)]
        if origin is dict and get_args(member):
            return get_args(member)[1]
    return None


def _annotation_at(root: Any, loc: Sequence[str | int]) -> Any:
    annotation = root
    for part in loc:
        if annotation is None:
            return None
        annotation = _descend(annotation, part)
    return annotation


def allowed_values(annotation: Any) -> list[str] | None:
    """The values an enum or Literal field (or a list of them) takes, as text; None for anything else."""
    values: list[str] = []
    for member in _members(annotation):
        if isinstance(member, type) and issubclass(member, enum.Enum):
            values += [str(item.value) for item in member]
        elif get_origin(member) is Literal:
            values += [str(arg) for arg in get_args(member)]
        elif get_origin(member) is list and (items := allowed_values(get_args(member)[0])):
            values += items
        elif member is not type(None):
            return None
    return values or None


def pattern_choices(pattern: str) -> list[str] | None:
    """`['a', 'b']` of a `^(a|b)$` pattern; None for any other pattern."""
    match = _PATTERN_CHOICES.match(pattern)
    return match.group(1).split("|") if match else None


def did_you_mean(word: str, candidates: Iterable[str]) -> str | None:
    """The nearest candidate to `word` (difflib, case-insensitive), or None when none is near."""
    by_lower = {candidate.lower(): candidate for candidate in candidates}
    match = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return by_lower[match[0]] if match else None


def _nested_match(model: type[BaseModel], key: str) -> str | None:
    """`hyperparameters.labels` for `labels` written one level too high (exact first, then near)."""
    nested = {
        name: sub
        for name, annotation in field_names(model).items()
        if name in model.model_fields and (sub := _model_of(annotation)) is not None
    }
    for exact in (True, False):
        for name, sub in nested.items():
            names = [n for n in field_names(sub) if n in sub.model_fields]
            hit = key if exact and key in names else None if exact else did_you_mean(key, names)
            if hit:
                return f"{name}.{hit}"
    return None


def _listing(values: Sequence[str]) -> str:
    shown = ", ".join(values[:MAX_LISTED])
    return shown + (f", … ({len(values) - MAX_LISTED} more)" if len(values) > MAX_LISTED else "")


def _got(value: Any) -> str:
    """` (got 'x')` for a short scalar input; nothing for containers or long text."""
    if isinstance(value, str | int | float | bool) and len(repr(value)) <= 60:
        return f" (got {value!r})"
    return ""


class FieldProblem(BaseModel):
    """One invalid field: where, what is wrong, what is allowed, the nearest allowed name or value."""

    field: str
    message: str
    allowed: list[str] | None = None
    suggestion: str | None = None

    def line(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


def _problem(error: Mapping[str, Any], root: Any, prefix: Sequence[str | int]) -> FieldProblem:
    loc = [part for part in error.get("loc", ()) if not (isinstance(part, str) and _TYPE_TAG.match(part))]
    model_loc = loc[len(prefix) :] if list(loc[: len(prefix)]) == list(prefix) else None
    field = ".".join(str(part) for part in loc)
    kind, message, value = error.get("type", ""), str(error.get("msg", "invalid")), error.get("input")
    ctx = error.get("ctx") or {}
    allowed: list[str] | None = None
    suggestion: str | None = None
    if kind == "extra_forbidden" and loc:
        parent = _model_of(_annotation_at(root, model_loc[:-1])) if model_loc and root is not None else None
        key = str(loc[-1])
        if parent is not None:
            allowed = [name for name in field_names(parent) if name in parent.model_fields]
            suggestion = did_you_mean(key, field_names(parent)) or _nested_match(parent, key)
        message = "unknown field" + (
            f"; did you mean {suggestion}?"
            if suggestion
            else f"; allowed: {_listing(allowed)}"
            if allowed
            else ""
        )
    elif kind in ("enum", "literal_error", "string_pattern_mismatch"):
        annotation = _annotation_at(root, model_loc) if model_loc is not None and root is not None else None
        allowed = allowed_values(annotation) or _QUOTED.findall(str(ctx.get("expected", ""))) or None
        if kind == "string_pattern_mismatch":
            allowed = pattern_choices(str(ctx.get("pattern", "")))
            if allowed:
                quoted = [repr(a) for a in allowed]
                message = "Input should be " + (
                    f"{', '.join(quoted[:-1])} or {quoted[-1]}" if len(quoted) > 1 else quoted[0]
                )
        if allowed and isinstance(value, str):
            suggestion = did_you_mean(value, allowed)
        message += _got(value) + (f"; did you mean {suggestion}?" if suggestion else "")
    elif kind in ("value_error", "assertion_error"):
        message = message.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    elif kind != "missing" and loc:
        message += _got(value)
    return FieldProblem(field=field, message=message, allowed=allowed, suggestion=suggestion)


def describe_errors(
    errors: Iterable[Mapping[str, Any]], root: Any = None, prefix: Sequence[str | int] = ()
) -> list[FieldProblem]:
    """Readable problems of pydantic `errors()`; `root`: the model their locations start at after `prefix`."""
    problems: list[FieldProblem] = []
    for error in errors:
        try:
            problem = _problem(error, root, prefix)
        except Exception:  # an error shape not foreseen here: pydantic's own line rather than a 500
            location = ".".join(str(part) for part in error.get("loc", ()))
            problem = FieldProblem(field=location, message=str(error.get("msg", "invalid")))
        if problem not in problems:
            problems.append(problem)
    return problems
