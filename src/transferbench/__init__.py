"""transferbench: benchmark transfer learning for image classification."""
from .config import RunConfig
from .errors import UserError
from .finished import evaluate_run as evaluate
from .training import run

__version__ = "0.1.0"

__all__ = ["RunConfig", "UserError", "run", "evaluate", "__version__"]
