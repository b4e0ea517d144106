"""dsc.passes: graph rewrites, one per file."""


def __getattr__(name: str):
    """Submodules load on first attribute access (`dsc.runtime.mesh` after `import dsc`)."""
    import importlib

    try:
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
