"""transferbench: benchmark transfer learning for image classification."""
from .config import RunConfig
from .errors import UserError

__version__ = "0.1.0"


def run(config: RunConfig, **kwargs) -> dict:
    from .training import run as _run

    return _run(config, **kwargs)


def evaluate(run_dir, **kwargs) -> dict:
    from .training import evaluate_run

    return evaluate_run(run_dir, **kwargs)


__all__ = ["RunConfig", "UserError", "run", "evaluate", "__version__"]
