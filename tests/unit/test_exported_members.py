"""The public API is `netvm.__all__`: everything in it exists, everything public is in it."""

from __future__ import annotations

import netvm


def test_all_names_exist_and_are_sorted() -> None:
    for name in netvm.__all__:
        assert hasattr(netvm, name), name
    assert list(netvm.__all__) == sorted(netvm.__all__)


def test_every_public_class_and_function_is_exported() -> None:
    public = {
        name
        for name, value in vars(netvm).items()
        if not name.startswith("_") and getattr(value, "__module__", "").startswith("netvm")
    }
    assert public == set(netvm.__all__)
