"""dsc: compile a PyTorch model and a declarative plan into per-rank programs.

    import dsc as ds
    compiled = ds.compile(model, "plan.json", example_inputs=(x, y))
"""

__version__ = "0.1.0"

from .api import CompiledModel, compile  # noqa: E402
from .capture import CaptureError  # noqa: E402

__all__ = ["compile", "CompiledModel", "CaptureError", "__version__"]
