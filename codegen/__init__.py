"""dsc.codegen: kernels generated from jinja2 templates, compiled, cached, and called from graphs.

    cache.py     on-disk cache of compiled kernels (content-addressed, safe under concurrent ranks)
    cpu.py       C/OpenMP backend: render a template, compile it with the system C compiler into a
                 shared library with a plain C ABI, call it through ctypes
    templates/   one jinja2 template per kernel family (StrictUndefined: a missing value is an error)
"""


from dsc._lazy import submodules

__getattr__ = submodules(__name__)  # dsc.<package>.<module> loads on first access
