"""The public API is `netvm.__all__`: everything in it exists, everything public is in it,
and the names type checkers see (the TYPE_CHECKING imports of netvm/__init__.py) are the
names loaded on first use (`_LAZY`)."""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys

import netvm


def type_checking_imports() -> dict[str, str]:
    """Name -> module of the imports under `if TYPE_CHECKING:` in netvm/__init__.py."""
    tree = ast.parse(inspect.getsource(netvm))
    found: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for statement in node.body:
                if isinstance(statement, ast.ImportFrom) and statement.module != "typing":
                    for alias in statement.names:
                        found[alias.asname or alias.name] = str(statement.module)
    return found


def test_all_names_exist_and_are_sorted() -> None:
    for name in netvm.__all__:
        assert hasattr(netvm, name), name
    assert list(netvm.__all__) == sorted(netvm.__all__)


def test_lazy_names_are_the_exported_and_the_type_checked_ones() -> None:
    lazy = netvm._LAZY
    assert set(lazy) == set(netvm.__all__)
    assert type_checking_imports() == lazy


def test_each_name_comes_from_the_module_it_is_listed_under() -> None:
    for name, module in netvm._LAZY.items():
        assert getattr(netvm, name) is getattr(importlib.import_module(module), name), name


def test_every_public_class_and_function_is_exported() -> None:
    for name in netvm.__all__:
        getattr(netvm, name)  # every lazy name loaded: vars(netvm) now holds them all
    public = {
        name
        for name, value in vars(netvm).items()
        if not name.startswith("_") and getattr(value, "__module__", "").startswith("netvm")
    }
    assert public == set(netvm.__all__)


def test_unknown_names_raise_attribute_error_and_submodules_still_import() -> None:
    assert not hasattr(netvm, "no_such_name")
    from netvm import naming  # a submodule, not a lazy name: the import system finds it

    assert naming.__name__ == "netvm.naming"


def test_star_import_in_a_fresh_interpreter() -> None:
    code = "from netvm import *\nprint(NetworkManager.__module__, FakeBackend.__module__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["netvm.manager", "netvm.backends.fake"]
