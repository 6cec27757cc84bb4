"""Boolean expressions over events.

A derived event holds, for one sequence, when its expression over other events holds for that
sequence. Expressions are data (no ``eval``): a tree of :class:`And` / :class:`Or` nodes whose
leaves are event names. They serialise to JSON and back, so a program definition can be stored.

Users write them as in the original eventor: a tuple means AND, ``or_(...)`` means OR,
``and_(...)`` is AND spelled out, and they nest::

    ev.add_event("ready", expr=(a, or_(b, c)))     # a AND (b OR c)
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias, runtime_checkable

from ..exceptions import ProgramDefinitionError

__all__ = ("And", "Expr", "Or", "and_", "or_")


@runtime_checkable
class _Named(Protocol):
    @property
    def name(self) -> str: ...


@dataclass(frozen=True, slots=True)
class And:
    """All operands hold."""

    operands: tuple[Expr, ...]


@dataclass(frozen=True, slots=True)
class Or:
    """At least one operand holds."""

    operands: tuple[Expr, ...]


#: An expression: an event name, or an And/Or node over expressions.
Expr: TypeAlias = str | And | Or


def and_(*operands: Any) -> And:
    """AND of events or expressions; a plain tuple means the same.

    .. versionadded:: 0.1
    """
    return And(tuple(normalize(o) for o in operands))


def or_(*operands: Any) -> Or:
    """OR of events or expressions.

    .. versionadded:: 0.1
    """
    return Or(tuple(normalize(o) for o in operands))


def normalize(value: Any) -> Expr:
    """Turn what the user wrote (events, names, tuples, and_/or_ nodes) into an expression.

    Raises:
        ProgramDefinitionError: for anything that is not an event, a name or a nesting of them.
    """
    if isinstance(value, And | Or):
        if not value.operands:
            raise ProgramDefinitionError(
                "an and_()/or_() expression needs at least one event; got none"
            )
        return value
    if isinstance(value, str):
        if not value:
            raise ProgramDefinitionError("an event name in an expression is empty")
        return value
    if isinstance(value, tuple | list):
        if not value:
            raise ProgramDefinitionError(
                "an empty tuple is not an expression; write (event_a, event_b) for AND"
            )
        return And(tuple(normalize(o) for o in value))
    if isinstance(value, _Named) and isinstance(value.name, str):
        return normalize(value.name)
    raise ProgramDefinitionError(
        f"cannot use {value!r} in an event expression: use events (or their names), "
        "tuples for AND, and aeventor.or_(...) for OR"
    )


def names(expr: Expr) -> Iterator[str]:
    """Every event name the expression refers to."""
    if isinstance(expr, str):
        yield expr
    else:
        for operand in expr.operands:
            yield from names(operand)


def holds(expr: Expr, fired: AbstractSet[str]) -> bool:
    """Whether the expression holds given the set of events fired for one sequence."""
    if isinstance(expr, str):
        return expr in fired
    leaves = _leaves(expr)
    if leaves is not None:
        # A node over event names only (the usual join of many steps): one set operation,
        # not a generator over its operands at every firing.
        if isinstance(expr, And):
            return leaves <= fired
        return not leaves.isdisjoint(fired)
    if isinstance(expr, And):
        return all(holds(o, fired) for o in expr.operands)
    return any(holds(o, fired) for o in expr.operands)


@functools.lru_cache(maxsize=4096)
def _leaves(expr: And | Or) -> frozenset[str] | None:
    """The operands of a node whose operands are all event names, else None."""
    if all(isinstance(o, str) for o in expr.operands):
        return frozenset(o for o in expr.operands if isinstance(o, str))
    return None


def to_json(expr: Expr) -> Any:
    """A JSON-ready form: a name, ``{"and": [...]}`` or ``{"or": [...]}``."""
    if isinstance(expr, str):
        return expr
    key = "and" if isinstance(expr, And) else "or"
    return {key: [to_json(o) for o in expr.operands]}


def from_json(data: Any) -> Expr:
    """Inverse of :func:`to_json`."""
    if isinstance(data, str):
        return data
    if isinstance(data, dict) and len(data) == 1:
        ((key, value),) = data.items()
        if key in ("and", "or") and isinstance(value, list):
            operands = tuple(from_json(v) for v in value)
            return And(operands) if key == "and" else Or(operands)
    raise ProgramDefinitionError(f"malformed stored expression: {data!r}")


def render(expr: Expr) -> str:
    """Human-readable text, for messages and logs."""
    if isinstance(expr, str):
        return expr
    joiner = " & " if isinstance(expr, And) else " | "
    return "(" + joiner.join(render(o) for o in expr.operands) + ")"


def all_names(exprs: Iterable[Expr]) -> set[str]:
    """Union of :func:`names` over several expressions."""
    return {n for e in exprs for n in names(e)}
