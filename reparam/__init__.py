"""reparam: fold multi-branch linear blocks into plain convolutions, exactly.

    folded = reparam.fold(model)            # a new torch.fx.GraphModule
    report = reparam.explain(model)         # what folded, what did not, and why
    reparam.save(folded, "deploy.onnx")     # .pt, .pt2, .onnx, .ts or .safetensors
"""

from . import kernel, rules
from .api import count_macs, count_ops, explain, fold, max_error
from .deploy import save
from .errors import CheckError, GuardError, ReparamError, TraceError
from .kernel import NotExact
from .report import Leftover, Region, Report
from .select import Keep
from .values import NoFold, Rule, law, rule

__version__ = "0.1.0"

__all__ = [
    "CheckError", "GuardError", "Keep", "Leftover", "NoFold", "NotExact", "Region", "ReparamError",
    "Report", "Rule", "TraceError",
    "count_macs", "count_ops", "explain", "fold", "kernel", "law", "max_error", "models", "rule",
    "rules", "save",
]


def __getattr__(name: str):
    if name == "models":  # imported lazily: the model zoo is not needed to fold
        import importlib

        return importlib.import_module(".models", __name__)
    raise AttributeError(name)
