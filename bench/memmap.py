"""Data bigger than RAM: the decoded store on disk, read a batch at a time through the OS page cache (ours), vs
the same images held in memory as one uint8 tensor (the baseline: how every dataset was loaded before the store).

    python bench/memmap.py            # the >= 4 GB store: 51,000 CIFAR-10 JPEGs upscaled to 224 px (7.7 GB decoded)
    python bench/memmap.py --quick    # 2,040 images at 224 px (0.3 GB): the same steps in about 2 minutes

Step 1 runs `transferbench.run` in fresh processes (so that peak resident memory, summary.json peak_memory_mb, is
the run's own), both variants on the same folder:
1. big: an image folder of --train-per-class x 10 upscaled training JPEGs (224 px, q90; made once, kept in --work)
   and --test-per-class x 10 test JPEGs. `linear-probe` (cached features, EfficientNet-Lite0 with its ImageNet
   weights, batch 32) with --train-subset. Ours starts from an empty cache, so its peak includes decoding every
   image into the store; the baseline then loads that store whole into memory, as the in-memory path does.
   Reported: peak memory of each, against the store's size (target: ours under half of it).
   Then one pass over every image of the store in random batches of 128 through `DiskImages` (what `Batches`
   does when the data does not fit on the device) in this process: seconds and the peak resident memory.
2. fits: training images/s with batches read from the store vs from an in-memory tensor of the same images, on a
   subset folder (--small-train images, --small-size px) that fits easily: `full` fine-tuning steps in one
   process, the two sources taking turns every --steps steps for --rounds rounds (target: ours within 10%).
   Taking turns in one process makes load from other jobs on a shared machine hit both alike; separate runs
   measured 10 to 50 img/s for the same configuration here.
Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import finish, have_real_data, subset_folder, weights_args  # noqa: E402


def _upscale(job: tuple[str, str, int]) -> None:
    from PIL import Image

    src, dst, size = job
    with Image.open(src) as im:
        im.convert("RGB").resize((size, size), Image.BICUBIC).save(dst, quality=90)


def upscaled_folder(dst: Path, train_per_class: int, test_per_class: int, size: int) -> tuple[Path, str]:
    """CIFAR-10 JPEGs (or generated images) re-encoded at size x size: what a folder of photos looks like to the
    store (every image decoded at full size). Made once; a complete folder is reused."""
    done = dst / ".complete"
    if done.is_file() and done.read_text() == f"{train_per_class} {test_per_class} {size}":
        return dst, "CIFAR-10 (JPEG q75 copy), upscaled" if have_real_data() else "generated images, upscaled"
    shutil.rmtree(dst, ignore_errors=True)
    source, described = subset_folder(dst.with_name(dst.name + "-source"), train_per_class, test_per_class)
    jobs = []
    for split in ("train", "test"):
        for cls in sorted((source / split).iterdir()):
            (dst / split / cls.name).mkdir(parents=True)
            for f in sorted(cls.iterdir()):
                jobs.append((str(f.resolve()), str(dst / split / cls.name / (f.stem + ".jpg")), size))
    t0 = time.perf_counter()
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(_upscale, jobs, chunksize=256))
    print(f"made {len(jobs):,} upscaled JPEGs in {dst} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    done.write_text(f"{train_per_class} {test_per_class} {size}")
    return dst, described + ", upscaled"


def child(spec: dict) -> None:
    """One run in this (fresh) process; the baseline gets every split as an in-memory tensor."""
    os.environ["TRANSFERBENCH_CACHE"] = spec["cache"]
    from transferbench import RunConfig, training
    from transferbench.host import tune_host_allocator
    from transferbench.images import ImageSet, as_tensor

    tune_host_allocator()  # as `transferbench run` does
    if spec["variant"] == "in-memory":
        load = training.load_dataset

        def in_memory(*args, **kwargs):
            data = load(*args, **kwargs)
            for key in ("train", "val", "test"):
                s = getattr(data, key)
                if s is not None:
                    setattr(data, key, ImageSet(as_tensor(s.images), s.labels, s.classes))
            return data

        training.load_dataset = in_memory
    summary = training.run(RunConfig(**spec["config"]), overwrite=True, progress=False)
    print("SUMMARY " + json.dumps(summary))


def run_child(variant: str, cache: Path, config: dict) -> dict:
    spec = {"variant": variant, "cache": str(cache), "config": config}
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{variant} run failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    line = next(li for li in out.stdout.splitlines()[::-1] if li.startswith("SUMMARY "))
    return json.loads(line[len("SUMMARY "):])


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def full_pass(store_file: Path, batch: int = 128) -> tuple[float, float, int]:
    """Every image of the store once, in random batches: (seconds, peak resident MB of this process, images)."""
    import numpy as np

    from transferbench.images import Store

    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
    store = Store(store_file)
    images = store.images()
    order = np.random.default_rng(0).permutation(len(images))
    t0 = time.perf_counter()
    total = 0
    for start in range(0, len(order), batch):
        total += int(images[order[start:start + batch]][:, :, ::32, ::32].sum())  # touch what was read
    return time.perf_counter() - t0, vm_hwm_mb(), len(images)


def big(work: Path, args, weights: dict, train_pc: int, test_pc: int, subset: int) -> dict:
    """Step 1: peak memory of a run on a store bigger than half of what the baseline holds."""
    out: dict = {}
    folder, described = upscaled_folder(work / f"upscaled-{train_pc}-{test_pc}-{args.size}", train_pc, test_pc,
                                        args.size)
    big = dict(dataset=f"folder:{folder}", model="tf_efficientnet_lite0", strategy="linear-probe", augment=False,
               image_size=args.size, train_subset=subset, val_fraction=0.01, epochs=3, batch_size=32, seed=0,
               workers=2, output_dir=str(work / "runs"), **weights)
    cache = work / "cache-big"
    shutil.rmtree(cache, ignore_errors=True)
    t0 = time.perf_counter()
    ours = run_child("store", cache, {**big, "name": "big-store"})
    ours_s = time.perf_counter() - t0
    store_file = next((cache / "decoded").glob("*.store"))
    store_mb = store_file.stat().st_size / 2**20
    print(f"big: {described}, {folder}; store {store_file} {store_mb:,.0f} MiB")
    print(f"  ours (the store on disk, decoded in the run): peak {ours['peak_memory_mb']:,.0f} MiB = "
          f"{ours['peak_memory_mb'] / store_mb:.1%} of the store, {ours_s:.0f} s, test acc {ours['test_acc']:.4f}")
    out.update(store_mb=round(store_mb), ours_peak_mb=round(ours["peak_memory_mb"]),
                  ours_peak_fraction=round(ours["peak_memory_mb"] / store_mb, 4), ours_acc=ours["test_acc"],
                  images=len(list(folder.rglob("*.jpg"))))
    if not args.no_big_baseline:
        shutil.rmtree(cache / "features", ignore_errors=True)  # the baseline extracts its features too
        t0 = time.perf_counter()
        base = run_child("in-memory", cache, {**big, "name": "big-in-memory"})
        print(f"  baseline (the store loaded into memory): peak {base['peak_memory_mb']:,.0f} MiB = "
              f"{base['peak_memory_mb'] / store_mb:.1%} of the store, {time.perf_counter() - t0:.0f} s, test acc "
              f"{base['test_acc']:.4f}")
        out.update(baseline_peak_mb=round(base["peak_memory_mb"]), baseline_acc=base["test_acc"])
    seconds, peak, n = full_pass(store_file)
    print(f"  every image of the store once, random batches of 128: {seconds:.0f} s ({n / seconds:,.0f} img/s), "
          f"peak resident {peak:,.0f} MiB")
    out.update(full_pass_s=round(seconds, 1), full_pass_peak_mb=round(peak))

    return out


def fits(work: Path, args, weights: dict) -> dict:
    """Step 2: training images/s from the store vs from an in-memory tensor, on data that fits. One process, one
    model, the two sources taking turns every --steps training steps (full fine-tuning: forward, backward, AdamW
    step; batches indexed, copied, augmented and resized exactly as `Batches` does in a run), so that load from
    other jobs on the machine hits both alike. The first round of each is warm-up and not counted."""
    import torch
    import torch.nn.functional as F

    os.environ["TRANSFERBENCH_CACHE"] = str(work / "cache-small")
    from transferbench.data import Batches, load_dataset, make_splits
    from transferbench.host import tune_host_allocator
    from transferbench.images import DiskImages, ImageSet, as_tensor
    from transferbench.models import create_model
    from transferbench.preprocess import Preprocess

    tune_host_allocator()
    small_train = args.small_train or (200 if args.quick else 1000)
    folder, _ = subset_folder(work / "small", small_train // 10 + 10, 20)
    data = load_dataset(f"folder:{folder}", None, storage_size=args.small_size, workers=2)  # decoded once, untimed
    train = make_splits(data, val_fraction=0.05, train_subset=small_train, seed=0).train
    assert isinstance(train.images, DiskImages)
    sources = {"in-memory": ImageSet(as_tensor(train.images), train.labels, train.classes), "store": train}
    torch.manual_seed(0)
    bundle = create_model("tf_efficientnet_lite0", len(train.classes), weights=weights.get("weights"))
    model = bundle.model.train().to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    prep = Preprocess.build(bundle.data_config, args.small_size, torch.device("cpu"), True)
    batches = {k: Batches(v, prep, torch.device("cpu")) for k, v in sources.items()}
    step_s: dict[str, list[float]] = {k: [] for k in sources}
    fetch_s: dict[str, list[float]] = {k: [] for k in sources}
    rounds, steps = (3, 2) if args.quick else (args.rounds, args.steps)
    for r in range(rounds + 1):
        for key in (("in-memory", "store") if r % 2 == 0 else ("store", "in-memory")):
            it = batches[key].iterate(64, shuffle=True, augment=True, drop_last=True,
                                      generator=torch.Generator().manual_seed(r),
                                      aug_generator=torch.Generator().manual_seed(r + 1))
            for _ in range(steps):
                t0 = time.perf_counter()
                x, y = next(it)  # index, read, copy, augment, resize, normalise: the data path
                t1 = time.perf_counter()
                loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if r > 0:
                    fetch_s[key].append(t1 - t0)
                    step_s[key].append(time.perf_counter() - t0)
    # The data path alone, many more batches, taking turns batch by batch: small differences show here.
    iters = {k: iter(()) for k in sources}
    alone: dict[str, list[float]] = {k: [] for k in sources}
    for i in range(40 if args.quick else 400):
        for key in (("in-memory", "store") if i % 2 == 0 else ("store", "in-memory")):
            t0 = time.perf_counter()
            if next(iters[key], None) is None:
                iters[key] = batches[key].iterate(64, shuffle=True, augment=True, drop_last=True,
                                                  generator=torch.Generator().manual_seed(i))
                next(iters[key])
            alone[key].append(time.perf_counter() - t0)
    data_ms = {k: statistics.median(v) * 1e3 for k, v in alone.items()}
    compute = statistics.median([st - f for k in sources for st, f in zip(step_s[k], fetch_s[k])])
    implied = (compute + data_ms["in-memory"] / 1e3) / (compute + data_ms["store"] / 1e3)
    med = {k: statistics.median(v) for k, v in step_s.items()}
    fetch = {k: statistics.median(v) * 1e3 for k, v in fetch_s.items()}
    rate = {k: 64 / med[k] for k in sources}
    print(f"fits: full fine-tuning, {args.small_size} px, batch 64, {len(train)} training images, {rounds} rounds of "
          f"{steps} step(s) per source, taking turns; median step: in-memory {med['in-memory']:.2f} s "
          f"({rate['in-memory']:.1f} img/s), store on disk {med['store']:.2f} s ({rate['store']:.1f} img/s): "
          f"{rate['store'] / rate['in-memory']:.3f}x. Data path alone (median per batch, in the same steps): "
          f"in-memory {fetch['in-memory']:.1f} ms, store {fetch['store']:.1f} ms; over {len(alone['store'])} batches "
          f"taking turns without the model: in-memory {data_ms['in-memory']:.1f} ms, store {data_ms['store']:.1f} ms, "
          f"which with the median model step ({compute:.2f} s) makes the store {implied:.3f}x the in-memory rate")
    return {"baseline_img_s": round(rate["in-memory"], 2), "ours_img_s": round(rate["store"], 2),
            "speed_ratio": round(rate["store"] / rate["in-memory"], 3),
            "baseline_batch_ms": round(data_ms["in-memory"], 2), "ours_batch_ms": round(data_ms["store"], 2),
            "implied_ratio": round(implied, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--work", default="/tmp/tb-bench-memmap", help="where the upscaled folder and caches live")
    ap.add_argument("--size", type=int, default=224, help="side of the upscaled JPEGs and of the store")
    ap.add_argument("--train-per-class", type=int, default=None, help="default 5000 (all), 200 with --quick")
    ap.add_argument("--test-per-class", type=int, default=None, help="default 100, 4 with --quick")
    ap.add_argument("--train-subset", type=int, default=None, help="big run: default 1000, 200 with --quick")
    ap.add_argument("--no-big-baseline", action="store_true", help="skip loading the big store into memory")
    ap.add_argument("--small-size", type=int, default=96)
    ap.add_argument("--small-train", type=int, default=None, help="default 1000, 200 with --quick")
    ap.add_argument("--rounds", type=int, default=30, help="fits: turns of each source (3 with --quick)")
    ap.add_argument("--steps", type=int, default=1, help="fits: training steps per turn (2 with --quick)")
    ap.add_argument("--part", choices=("all", "big", "fits"), default="all")
    args = ap.parse_args()
    if args.child:
        return child(json.loads(args.child))
    train_pc = args.train_per_class or (200 if args.quick else 5000)
    test_pc = args.test_per_class or (4 if args.quick else 100)
    subset = args.train_subset or (200 if args.quick else 1000)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    weights = weights_args()
    result: dict = {}

    if args.part in ("all", "big"):
        result.update(big(work, args, weights, train_pc, test_pc, subset))
    if args.part in ("all", "fits"):
        result.update(fits(work, args, weights))
    finish(result)


if __name__ == "__main__":
    main()
