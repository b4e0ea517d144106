"""dsc.schemas: the plan (pydantic) and the DeepSpeed config translation."""

from .deepspeed import Translation, is_deepspeed_config, translate_deepspeed
from .errors import PlanError, PlanWarning, Problem
from .load import load_plan, validate_source
from .plan import Batch, Optimizer, Parallel, Plan, Precision, Scheduler, Zero

__all__ = ["Plan", "PlanError", "Problem", "PlanWarning", "load_plan", "is_deepspeed_config",
           "translate_deepspeed", "Translation", "validate_source",
           "Parallel", "Zero", "Optimizer", "Scheduler", "Precision", "Batch"]
