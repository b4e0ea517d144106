"""dsc.codegen: kernels generated from jinja2 templates, compiled, cached, and called from graphs.

    cache.py     on-disk cache of compiled kernels (content-addressed, safe under concurrent ranks)
    cpu.py       C/OpenMP backend: render a template, compile it with the system C compiler into a
                 shared library with a plain C ABI, call it through ctypes
    templates/   one jinja2 template per kernel family (StrictUndefined: a missing value is an error)
"""


def __getattr__(name: str):
    """Submodules load on first attribute access (`dsc.runtime.mesh` after `import dsc`)."""
    import importlib

    try:
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
