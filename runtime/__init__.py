"""dsc.runtime: what executes compiled rank programs on torch.distributed."""


from dsc._lazy import submodules

__getattr__ = submodules(__name__)  # dsc.<package>.<module> loads on first access
