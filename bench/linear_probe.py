"""Linear probe two ways on the same model, data, image size and epochs:
plain (a frozen-backbone forward every epoch) vs transferbench's cached features (one forward per split).

    python bench/linear_probe.py            # full: EfficientNet-Lite0, 160 px, 10 epochs
    python bench/linear_probe.py --quick    # under 2 minutes on 2 cores

Both runs go through `transferbench.run`; times are end to end (data in memory, feature extraction,
head training, validation every epoch, the test split). The cached run starts from an empty feature cache,
so its time includes extracting every feature it uses.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import finish, subset_folder, timer, weights_args  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--train-per-class", type=int, default=None)
    ap.add_argument("--test-per-class", type=int, default=None)
    args = ap.parse_args()
    from transferbench.host import tune_host_allocator

    tune_host_allocator()  # as `transferbench run` does; the baseline shares the process, so gains it too
    size = args.image_size or (64 if args.quick else 160)
    train_pc = args.train_per_class or (40 if args.quick else 550)
    test_pc = args.test_per_class or (10 if args.quick else 50)

    work = Path(tempfile.mkdtemp(prefix="tb-bench-lp-"))
    os.environ["TRANSFERBENCH_CACHE"] = str(work / "cache")  # empty: the cached run pays for its extraction
    folder, described = subset_folder(work / "data", train_pc, test_pc)
    from transferbench import RunConfig, run

    common = dict(dataset=f"folder:{folder}", model="tf_efficientnet_lite0", strategy="linear-probe", epochs=args.epochs,
                  image_size=size, augment=False, val_fraction=0.1, batch_size=64, seed=0, workers=2,
                  output_dir=str(work / "runs"), **weights_args())
    from transferbench.data import load_dataset

    load_dataset(f"folder:{folder}", None, storage_size=size, workers=2)  # decode once, outside both timings

    with timer() as plain_t:
        plain = run(RunConfig(**common, feature_cache=False, name="plain"), progress=False)
    with timer() as cached_t:
        cached = run(RunConfig(**common, feature_cache=True, name="cached"), progress=False)
    print(f"data: {described}, {train_pc}/class train (10% of it validation), {test_pc}/class test, {size} px, "
          f"{args.epochs} epochs, EfficientNet-Lite0")
    print(f"plain  : {plain_t['s']:8.1f} s  test acc {plain['test_acc']:.4f}")
    print(f"cached : {cached_t['s']:8.1f} s  test acc {cached['test_acc']:.4f}  ({plain_t['s'] / cached_t['s']:.2f}x faster)")
    finish({"baseline_s": round(plain_t["s"], 2), "ours_s": round(cached_t["s"], 2),
            "speedup": round(plain_t["s"] / cached_t["s"], 2),
            "baseline_acc": plain["test_acc"], "ours_acc": cached["test_acc"]})


if __name__ == "__main__":
    main()
