"""What the benchmarks share: where the real data is, and small image folders cut from it."""
from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TRANSFERBENCH_SHARED", REPO.parent / "shared"))
CIFAR_JPEG = SHARED / "data" / "cifar10-jpeg"
LITE0_WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0.in1k.pth"


def have_real_data() -> bool:
    return (CIFAR_JPEG / "train").is_dir() and LITE0_WEIGHTS.is_file()


def subset_folder(dst: Path, train_per_class: int, test_per_class: int) -> tuple[Path, str]:
    """An image folder of the first N images per class: symlinks into the real CIFAR-10 JPEG copy when
    it is there, else generated images (so the script still runs on a fresh clone)."""
    if dst.exists():
        return dst, _describe(dst)
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        if have_real_data():
            for cls_dir in sorted((CIFAR_JPEG / split).iterdir()):
                out = dst / split / cls_dir.name
                out.mkdir(parents=True)
                for f in sorted(cls_dir.iterdir())[:n]:
                    (out / f.name).symlink_to(f)
        else:
            from PIL import Image

            rng = np.random.default_rng(0 if split == "train" else 1)
            for c in range(10):
                out = dst / split / f"class{c}"
                out.mkdir(parents=True)
                for i in range(n):
                    img = rng.integers(0, 120, (32, 32, 3), dtype=np.uint8)
                    img[..., c % 3] += 100 + 10 * (c // 3)
                    Image.fromarray(img).save(out / f"{i:04d}.png")
    return dst, _describe(dst)


def _describe(dst: Path) -> str:
    return "CIFAR-10 (JPEG q75 copy)" if have_real_data() else "generated images (no ../shared found)"


def weights_args() -> dict:
    return {"weights": str(LITE0_WEIGHTS)} if LITE0_WEIGHTS.is_file() else {"pretrained": False}


@contextmanager
def timer():
    box = {}
    t0 = time.perf_counter()
    yield box
    box["s"] = time.perf_counter() - t0


def finish(result: dict) -> None:
    """Benchmarks end with one JSON line on stdout."""
    sys.stdout.flush()
    print(json.dumps(result), flush=True)
