"""`transferbench evaluate RUN_DIR`: rebuild a finished run's model and re-evaluate its test split."""
from __future__ import annotations

import json
import logging

from ..config import DEVICES
from ..finished import evaluate_run

HELP = "re-evaluate a finished run's test split from its model.pt"
log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    parser.add_argument("run_dir")
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--data-dir", default=None, help="where the run's data lives now, if it moved")


def command(args) -> int:
    result = evaluate_run(args.run_dir, device=args.device, data_dir=args.data_dir)
    print(json.dumps(result))
    if result["test_acc"] != result["recorded_test_acc"]:
        log.warning(f"test accuracy {result['test_acc']:.6f} differs from the recorded "
                    f"{result['recorded_test_acc']:.6f}")
    return 0
