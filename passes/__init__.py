"""dsc.passes: graph rewrites, one per file."""


from dsc._lazy import submodules

__getattr__ = submodules(__name__)  # dsc.<package>.<module> loads on first access
