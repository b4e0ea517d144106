import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Triton reads TRITON_INTERPRET when it is imported (its library functions are jitted then), so the
# interpreter must be chosen before anything imports triton. On a machine without a GPU the Triton
# tests run its kernels on CPU tensors through the interpreter; the backend stays off unless a plan
# asks for "triton" (with "auto", CPU graphs use the C backend).
if os.environ.get("TRITON_INTERPRET") is None and not os.environ.get("CUDA_VISIBLE_DEVICES"):
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:
        pass
