"""Linear probe two ways on the same model, data, image size and epochs:
plain (a frozen-backbone forward every epoch) vs transferbench's cached features (one forward per split).

    python bench/linear_probe.py                # EfficientNet-Lite0, 160 px, 10 epochs, 3 repeats (hours on 2 cores)
    python bench/linear_probe.py --quick        # 64 px, 40 train images/class: a few minutes on 2 loaded cores

Both paths go through `transferbench.run`; times are end to end (feature extraction, head training,
validation every epoch, the test split). Images are decoded once beforehand, outside every timing. Before
anything is timed, each path makes one untimed 1-epoch run (imports, first kernels, allocator). Then the
two alternate over the repeats (plain, cached, cached, plain, ...) so neither always goes first. Every run
starts with its own empty cache directory (TRANSFERBENCH_CACHE) holding only the decoded images, so each
cached run pays for extracting every feature it uses. Reported: median and min-max of each path's seconds,
and the median (min-max) of the per-repeat ratio plain / cached.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import finish, subset_folder, timer, weights_args  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--image-size", type=int, default=None, help="default 160, 64 with --quick")
    ap.add_argument("--train-per-class", type=int, default=None, help="default 550, 40 with --quick")
    ap.add_argument("--test-per-class", type=int, default=None, help="default 50, 10 with --quick")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    from transferbench.host import tune_host_allocator

    tune_host_allocator()  # as `transferbench run` does; both paths share the process, so both have it
    size = args.image_size or (64 if args.quick else 160)
    train_pc = args.train_per_class or (40 if args.quick else 550)
    test_pc = args.test_per_class or (10 if args.quick else 50)

    work = Path(tempfile.mkdtemp(prefix="tb-bench-lp-"))
    decoded = work / "decoded-cache"
    os.environ["TRANSFERBENCH_CACHE"] = str(decoded)
    folder, described = subset_folder(work / "data", train_pc, test_pc)
    from transferbench import RunConfig, run
    from transferbench.data import load_dataset

    load_dataset(f"folder:{folder}", None, storage_size=size, workers=2)  # decode once, outside every timing

    common = dict(dataset=f"folder:{folder}", model="tf_efficientnet_lite0", strategy="linear-probe",
                  image_size=size, augment=False, val_fraction=0.1, batch_size=64, seed=0, workers=2,
                  device=args.device, output_dir=str(work / "runs"), **weights_args())
    count = 0

    def one_run(cached: bool, epochs: int) -> tuple[float, dict]:
        nonlocal count
        count += 1
        cache = work / f"cache-{count}"  # empty but for the decoded images: no features from an earlier run
        (cache / "decoded").parent.mkdir(parents=True)
        (cache / "decoded").symlink_to(decoded / "decoded")
        os.environ["TRANSFERBENCH_CACHE"] = str(cache)
        name = f"run-{count}-{'cached' if cached else 'plain'}"
        cfg = RunConfig(**common, epochs=epochs, feature_cache=cached, name=name)
        with timer() as t:
            summary = run(cfg, progress=False)
        assert not (cache / "features").exists() or cached, "plain run wrote features"
        return t["s"], summary

    for cached in (False, True):  # warm-up, untimed: imports, CUDA start-up, first kernels
        one_run(cached, 1)
    times = {"plain": [], "cached": []}
    accs = {"plain": [], "cached": []}
    for r in range(args.repeats):
        for path in (("plain", "cached") if r % 2 == 0 else ("cached", "plain")):
            s, summary = one_run(path == "cached", args.epochs)
            times[path].append(s)
            accs[path].append(summary["test_acc"])
            print(f"repeat {r + 1}: {path:6s} {s:8.1f} s  test acc {summary['test_acc']:.4f}", flush=True)
    ratios = [p / c for p, c in zip(times["plain"], times["cached"])]

    def med(xs: list[float]) -> tuple[float, float, float]:
        return statistics.median(xs), min(xs), max(xs)

    print(f"data: {described}, {train_pc}/class train (10% of it validation), {test_pc}/class test, {size} px, "
          f"{args.epochs} epochs, EfficientNet-Lite0, {args.repeats} repeats (order alternating), device {args.device}")
    print(f"{'path':8s} {'median s':>9s} {'min-max s':>17s}  test acc (each repeat)")
    for path in ("plain", "cached"):
        m, lo, hi = med(times[path])
        print(f"{path:8s} {m:9.1f} {f'{lo:.1f}-{hi:.1f}':>17s}  {' '.join(f'{a:.4f}' for a in accs[path])}")
    m, lo, hi = med(ratios)
    print(f"plain / cached, per repeat: median {m:.2f}x (min-max {lo:.2f}-{hi:.2f}x); "
          f"ratio of the medians {med(times['plain'])[0] / med(times['cached'])[0]:.2f}x")
    finish({"baseline_s": round(med(times["plain"])[0], 2), "ours_s": round(med(times["cached"])[0], 2),
            "baseline_s_min_max": [round(min(times["plain"]), 2), round(max(times["plain"]), 2)],
            "ours_s_min_max": [round(min(times["cached"]), 2), round(max(times["cached"]), 2)],
            "speedup": round(m, 3), "speedup_min_max": [round(lo, 3), round(hi, 3)],
            "baseline_acc": statistics.median(accs["plain"]), "ours_acc": statistics.median(accs["cached"]),
            "repeats": args.repeats, "epochs": args.epochs, "image_size": size})


if __name__ == "__main__":
    main()
