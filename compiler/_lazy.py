"""`__getattr__` for dsc's packages (PEP 562): a submodule loads on first attribute access, so
`import dsc` (and `dsc run`) stays light while `dsc.runtime.mesh` keeps working."""

from __future__ import annotations

import importlib


def submodules(package: str):
    """A module-level `__getattr__` for `package` that imports `package.<name>` on demand."""

    def __getattr__(name: str):
        try:
            return importlib.import_module(f".{name}", package)
        except ModuleNotFoundError as exc:
            if exc.name != f"{package}.{name}":
                raise
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None

    return __getattr__
