"""Tests for boolean expressions over events (aeventor.program.expr)."""

from __future__ import annotations

import itertools
import json
from types import SimpleNamespace
from typing import Any

import pytest

import aeventor as evr
from aeventor.exceptions import ProgramDefinitionError
from aeventor.program import expr as _expr
from aeventor.program.expr import And, Or, and_, or_


def subsets(names: str) -> list[frozenset[str]]:
    return [
        frozenset(combo)
        for size in range(len(names) + 1)
        for combo in itertools.combinations(names, size)
    ]


# --- normalize -----------------------------------------------------------------------------


def test_a_name_normalizes_to_itself() -> None:
    assert _expr.normalize("a") == "a"


def test_a_tuple_means_and() -> None:
    assert _expr.normalize(("a", "b")) == And(("a", "b"))


def test_a_list_means_and() -> None:
    assert _expr.normalize(["a", "b"]) == And(("a", "b"))


def test_a_one_element_tuple_is_an_and_of_one() -> None:
    assert _expr.normalize(("a",)) == And(("a",))


def test_or_builds_an_or_node() -> None:
    assert or_("a", "b") == Or(("a", "b"))
    assert _expr.normalize(or_("a", "b")) == Or(("a", "b"))


def test_and_builds_an_and_node_equal_to_a_tuple() -> None:
    assert and_("a", "b") == And(("a", "b"))
    assert _expr.normalize(and_("a", "b")) == _expr.normalize(("a", "b"))


def test_nesting_normalizes_every_level() -> None:
    expr = _expr.normalize(("a", or_("b", ("c", "d")), ["e", or_("f")]))
    assert expr == And(
        (
            "a",
            Or(("b", And(("c", "d")))),
            And(("e", Or(("f",)))),
        )
    )


def test_or_and_and_normalize_their_operands() -> None:
    assert or_(("a", "b"), "c") == Or((And(("a", "b")), "c"))
    assert and_(or_("a", "b"), ["c"]) == And((Or(("a", "b")), And(("c",))))


def test_objects_with_a_name_become_their_name() -> None:
    a, b = SimpleNamespace(name="a"), SimpleNamespace(name="b")
    assert _expr.normalize(a) == "a"
    assert _expr.normalize((a, or_(b, "c"))) == And(("a", Or(("b", "c"))))


def test_eventor_events_become_their_name() -> None:
    ev = evr.Eventor(name="prog")
    a, b = ev.add_event("a"), ev.add_event("b")
    assert _expr.normalize((a, b)) == And(("a", "b"))
    assert evr.or_(a, b) == Or(("a", "b"))


def test_normalize_keeps_an_already_normalized_expression() -> None:
    expr = And(("a", Or(("b", "c"))))
    assert _expr.normalize(expr) == expr


def test_package_exports_the_same_builders() -> None:
    assert evr.and_ is and_
    assert evr.or_ is or_


# --- normalize errors ----------------------------------------------------------------------


@pytest.mark.parametrize("value", [(), []], ids=["tuple", "list"])
def test_an_empty_tuple_is_rejected_naming_the_and_spelling(value: Any) -> None:
    with pytest.raises(ProgramDefinitionError, match="empty tuple") as info:
        _expr.normalize(value)
    assert "(event_a, event_b) for AND" in str(info.value)


def test_a_nested_empty_tuple_is_rejected() -> None:
    with pytest.raises(ProgramDefinitionError, match="empty tuple"):
        _expr.normalize(("a", ()))


@pytest.mark.parametrize("node", [and_(), or_()], ids=["and_", "or_"])
def test_an_empty_and_or_node_is_rejected(node: Any) -> None:
    with pytest.raises(ProgramDefinitionError, match="at least one event"):
        _expr.normalize(node)


def test_an_empty_and_inside_or_is_rejected_when_built() -> None:
    with pytest.raises(ProgramDefinitionError, match="at least one event"):
        or_("a", and_())


def test_an_empty_and_is_rejected_by_add_event() -> None:
    ev = evr.Eventor(name="prog")
    ev.add_event("a")
    with pytest.raises(ProgramDefinitionError, match="at least one event"):
        ev.add_event("d", expr=and_())


def test_an_empty_name_is_rejected() -> None:
    with pytest.raises(ProgramDefinitionError, match="empty"):
        _expr.normalize(("a", ""))


@pytest.mark.parametrize(
    "value",
    [None, 1, 2.5, True, b"a", {"a"}, {"a": 1}, object()],
    ids=["None", "int", "float", "bool", "bytes", "set", "dict", "object"],
)
def test_bad_types_are_rejected_naming_the_fix(value: Any) -> None:
    with pytest.raises(ProgramDefinitionError) as info:
        _expr.normalize(value)
    message = str(info.value)
    assert repr(value) in message
    assert "tuples for AND" in message
    assert "aeventor.or_(...) for OR" in message


def test_a_bad_type_nested_in_or_is_rejected() -> None:
    with pytest.raises(ProgramDefinitionError, match="tuples for AND"):
        or_("a", 3)


@pytest.mark.parametrize("name", [3, None, ""], ids=["int", "None", "empty"])
def test_an_object_whose_name_is_not_an_event_name_is_rejected(name: Any) -> None:
    # Only a non-empty string can be an event name: anything else would end up as a leaf
    # of the expression tree (and in the stored definition).
    with pytest.raises(ProgramDefinitionError):
        _expr.normalize(SimpleNamespace(name=name))


# --- names -----------------------------------------------------------------------------------


def test_names_lists_every_leaf_in_order_with_repeats() -> None:
    expr = _expr.normalize(("a", or_("b", ("a", "c"))))
    assert list(_expr.names(expr)) == ["a", "b", "a", "c"]


def test_names_of_a_name_is_the_name() -> None:
    assert list(_expr.names("a")) == ["a"]


def test_all_names_unions_several_expressions() -> None:
    exprs = [_expr.normalize(("a", "b")), "c", or_("b", "d")]
    assert _expr.all_names(exprs) == {"a", "b", "c", "d"}


# --- holds -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fired", subsets("ab"), ids=repr)
def test_holds_for_a_name(fired: frozenset[str]) -> None:
    assert _expr.holds("a", fired) is ("a" in fired)


@pytest.mark.parametrize("fired", subsets("abc"), ids=repr)
def test_holds_for_and(fired: frozenset[str]) -> None:
    expected = {"a", "b", "c"} <= fired
    assert _expr.holds(_expr.normalize(("a", "b", "c")), fired) is expected


@pytest.mark.parametrize("fired", subsets("abc"), ids=repr)
def test_holds_for_or(fired: frozenset[str]) -> None:
    expected = bool(fired & {"a", "b", "c"})
    assert _expr.holds(or_("a", "b", "c"), fired) is expected


@pytest.mark.parametrize("fired", subsets("abcd"), ids=repr)
def test_holds_for_nested(fired: frozenset[str]) -> None:
    # a AND (b OR (c AND d))
    expr = _expr.normalize(("a", or_("b", ("c", "d"))))
    expected = "a" in fired and ("b" in fired or {"c", "d"} <= fired)
    assert _expr.holds(expr, fired) is expected


@pytest.mark.parametrize("fired", subsets("abcd"), ids=repr)
def test_holds_for_or_of_ands(fired: frozenset[str]) -> None:
    expr = or_(("a", "b"), ("c", "d"))
    expected = {"a", "b"} <= fired or {"c", "d"} <= fired
    assert _expr.holds(expr, fired) is expected


def test_holds_ignores_unrelated_events() -> None:
    assert not _expr.holds(_expr.normalize(("a", "b")), {"a", "x", "y"})


# --- JSON --------------------------------------------------------------------------------------

EXPRESSIONS = [
    "a",
    _expr.normalize(("a", "b")),
    or_("a", "b"),
    _expr.normalize(("a", or_("b", ("c", "d")))),
    or_(("a", or_("b", "c")), "d"),
    _expr.normalize(("a",)),
]


def test_to_json_shapes() -> None:
    expr = _expr.normalize(("a", or_("b", "c")))
    assert _expr.to_json("a") == "a"
    assert _expr.to_json(expr) == {"and": ["a", {"or": ["b", "c"]}]}


@pytest.mark.parametrize("expr", EXPRESSIONS, ids=_expr.render)
def test_json_round_trip(expr: _expr.Expr) -> None:
    data = json.loads(json.dumps(_expr.to_json(expr)))
    assert _expr.from_json(data) == expr


@pytest.mark.parametrize(
    "data",
    [
        None,
        3,
        ["a", "b"],
        {},
        {"xor": ["a"]},
        {"and": "a"},
        {"and": ["a"], "or": ["b"]},
        {"and": ["a", 3]},
        {"or": [{"not": ["a"]}]},
    ],
    ids=repr,
)
def test_from_json_rejects_malformed_data(data: Any) -> None:
    with pytest.raises(ProgramDefinitionError, match="malformed stored expression"):
        _expr.from_json(data)


# --- render --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "text"),
    [
        ("a", "a"),
        (_expr.normalize(("a", "b")), "(a & b)"),
        (or_("a", "b"), "(a | b)"),
        (_expr.normalize(("a", or_("b", ("c", "d")))), "(a & (b | (c & d)))"),
        (_expr.normalize(("a",)), "(a)"),
    ],
    ids=repr,
)
def test_render(expr: _expr.Expr, text: str) -> None:
    assert _expr.render(expr) == text
