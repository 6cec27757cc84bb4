"""The public namespace: ``aeventor.__all__`` names what the package exports, lazily."""

from __future__ import annotations

import pytest

import aeventor


@pytest.mark.parametrize("name", aeventor.__all__)
def test_every_exported_name_resolves(name: str) -> None:
    assert getattr(aeventor, name) is not None


@pytest.mark.parametrize("name", aeventor.__all__)
def test_every_exported_name_is_defined_in_aeventor(name: str) -> None:
    obj = getattr(aeventor, name)
    module = getattr(obj, "__module__", None)
    assert isinstance(module, str)
    assert module == "aeventor" or module.startswith("aeventor.")


def test_all_is_sorted_without_duplicates() -> None:
    names = list(aeventor.__all__)
    assert names == sorted(names)
    assert len(names) == len(set(names))


def test_dir_lists_every_exported_name() -> None:
    assert set(aeventor.__all__) <= set(dir(aeventor))


def test_an_unknown_name_raises_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        aeventor.nope  # noqa: B018


def test_exceptions_share_one_root() -> None:
    errors = [getattr(aeventor, n) for n in aeventor.__all__ if n.endswith("Error")]
    assert errors
    for error in errors:
        assert issubclass(error, aeventor.AeventorError)
