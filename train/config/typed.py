"""Plain data → a tree of dataclasses, checked against the type hints; every problem reported
at once (``key: what is wrong; how to fix it``). Generic: :mod:`train.config.recipe` holds the tree."""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Literal, Optional, Union, cast


class RecipeError(ValueError):
    """The one error type of a bad recipe, override or run-directory record, wherever it is found
    (the launcher exits 2 with it, a rank reports it and exits 2): ``problems`` holds one line each,
    ``source`` (the recipe file or argument, when known) starts the message."""

    def __init__(self, source: Optional[str], problems: list[str]):
        self.source, self.problems = source, problems
        if source is None:
            text = "\n".join(problems)
        elif len(problems) == 1:
            text = f"{source}: {problems[0]}"
        else:
            text = f"{source}: {len(problems)} problems\n" + "\n".join(f"  - {p}" for p in problems)
        super().__init__(text)


def field_docs(cls: type) -> dict[str, str]:
    """Field name → the docstring written under it in the class body."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)):
            docs[stmt.target.id] = str(nxt.value.value)
    return docs


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        return f"list of {_type_name(arg)}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


_YAML11_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")
INT_LIMIT = 2**62
"""Integers beyond it (steps, sizes, counts) cannot be meant, and overflow int64 arithmetic downstream."""


def _convert(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted or record a problem."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _convert(value, non_none[0], key, problems)
        for arg in non_none:  # e.g. an integer or "auto": the first type that takes the value
            tried: list[str] = []
            converted = _convert(value, arg, key, tried)
            if not tried:
                return converted
        problems.append(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {value!r}")
            return None
        return _build(cast(type, tp), value, key, problems)  # an annotation: a dataclass type, not an instance
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            problems.append(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}; {hint}"
                            f"set {key}={choices[0]}")
        return value
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            problems.append(f"{key}: expected a list, got {value!r}")
            return None
        return [_convert(v, arg, f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{key}: expected an integer, got {value!r}")
        elif abs(value) > INT_LIMIT:
            problems.append(f"{key}: {value} is beyond any count a run can hold (at most {INT_LIMIT:,} = 2^62)")
        return value
    if tp is float:
        if isinstance(value, str) and _YAML11_FLOAT.match(value.strip()):
            value = float(value)  # YAML 1.1 reads 2e-4 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{key}: expected a number, got {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{key}: expected a string, got {value!r}; quote it in YAML")
        return value
    if tp is dict:
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {value!r}")
        return value
    return value


def _build(cls: type, data: dict, prefix: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean {(prefix + '.' if prefix else '') + close[0]}?" if close else \
                f"valid keys: {', '.join(names)}"
            problems.append(f"{path}: unknown key; {hint}")
            continue
        kwargs[key] = _convert(value, hints[key], path, problems)
    try:
        return cls(**{k: v for k, v in kwargs.items() if v is not None or _optional(hints[k])})
    except TypeError as err:  # only reachable through earlier recorded problems
        problems.append(f"{prefix or 'recipe'}: {err}")
        return cls()


def _optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)


def from_dict(cls: type, data: Any, what: str = "recipe") -> Any:
    """Build ``cls`` from plain data; raise :class:`RecipeError` listing every problem."""
    problems: list[str] = []
    if not isinstance(data, dict):
        raise RecipeError(None, [f"{what}: expected a mapping at the top level, got {type(data).__name__}"])
    built = _build(cls, data, "", problems)
    if problems:
        raise RecipeError(None, problems)
    return built
