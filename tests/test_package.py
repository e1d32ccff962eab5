"""The public surface: sorted, complete `__all__` lists and one error tree."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType

import pytest

import meshchat
import meshchat.errors
from meshchat.errors import MeshchatError


def _modules() -> list[ModuleType]:
    names = [info.name for info in pkgutil.walk_packages(meshchat.__path__, "meshchat.")]
    return [meshchat, *map(importlib.import_module, names)]


MODULES = _modules()


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_module_has_docstring_and_resolvable_all(module: ModuleType) -> None:
    # The order of __all__ is ruff's job (RUF022, isort-style), checked by `make lint`.
    assert module.__doc__, f"{module.__name__} has no module docstring"
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{module.__name__} has no __all__"
    for name in exported:
        assert hasattr(module, name), f"{module.__name__}.__all__ names missing {name!r}"


NOT_REEXPORTED = {
    # It holds the org's keys (it imports meshchat.e2ee); the broker imports meshchat.directory
    # and must never load crypto, so it is imported by its full name only.
    "meshchat.directory.signing",
    # The directory service uses the org keys (through signing) and the client transport.
    "meshchat.directory.service",
}


@pytest.mark.parametrize(
    "package", [m for m in MODULES if hasattr(m, "__path__") and m is not meshchat], ids=str
)
def test_package_reexports_every_public_name_of_its_modules(package: ModuleType) -> None:
    for info in pkgutil.iter_modules(package.__path__, f"{package.__name__}."):
        if info.name in NOT_REEXPORTED:
            continue
        submodule = importlib.import_module(info.name)
        missing = set(getattr(submodule, "__all__", ())) - set(package.__all__)
        assert not missing, f"{package.__name__} does not re-export {sorted(missing)}"


def test_every_error_is_a_meshchat_error_and_drawn_in_the_tree() -> None:
    errors = [
        obj
        for _, obj in inspect.getmembers(meshchat.errors, inspect.isclass)
        if issubclass(obj, BaseException) and obj.__module__ == "meshchat.errors"
    ]
    assert len(errors) >= 5
    docstring = meshchat.errors.__doc__ or ""
    for error in errors:
        assert issubclass(error, MeshchatError)
        assert error.__name__ in docstring, f"{error.__name__} is missing from the drawn tree"
