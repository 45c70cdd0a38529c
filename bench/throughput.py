"""Training throughput, decomposed: what each change from the usual loop to transferbench's is worth on its own.

One process, the same training images, model (EfficientNet-Lite0, its real ImageNet weights when ../shared has
them), `full` fine-tuning with AdamW and label smoothing 0.1, batch size, resolution and device for every step:

  a  baseline       torchvision ImageFolder + per-image PIL transforms (resize, random crop with reflect padding,
                    flip, ToTensor, normalise) + DataLoader(--workers, persistent, pinned on CUDA); NCHW float32
  b  data path      + our data path alone: images decoded once into one uint8 tensor in host memory, crop/flip/
                    resize/normalise per batch with `transferbench.data.Preprocess` (on the device); same loop,
                    NCHW float32
  c  channels_last  + model and batches in channels_last
  d  AMP            + bf16 (fp16 without bf16) autocast                    CUDA only; n/a on CPU
  e  resident data  + the uint8 images held on the device (`Batches`)      CUDA only; on CPU the data is already in
                                                                           host memory: n/a
  f  run()          `transferbench.run` on the same images (minus a 5% validation split): a cross-check of the
                    ladder's last step, read from metrics.jsonl (images/s of the training epoch after the first).
                    Where run() reads its batches from the decoded store on disk (page cache) rather than from
                    one tensor in memory, that difference is part of f vs the last step.
  g  compiled       (--compile) f with torch.compile: one run of 1 + repeats epochs after the others, the first
                    (compiling) epoch discarded

Steps a-f are measured round-robin in a rotating order: each repeat times one pass over the training images
per step a-e (all sharing one training loop, after one untimed warm-up pass each) and one 2-epoch run() for f.
Reported: median and min-max images/s over the repeats, and the median (min-max) over the repeats of
each step's images/s relative to the previous measured step and to the baseline in the same repeat. The
allocator setting of `transferbench run` (transferbench.host.tune_host_allocator) is applied first, so every
step has it.

    python bench/throughput.py                    # 128 px, batch 64, 1,280 training images, 3 repeats
    python bench/throughput.py --quick            # 96 px, batch 32, 100 images: 1-4.5 minutes on 2 loaded cores
    python bench/throughput.py --device cuda --train-per-class 600 --workers 8 [--compile]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import finish, subset_folder, weights_args  # noqa: E402

STEPS = [  # key, label
    ("baseline", "a  ImageFolder + PIL + DataLoader, NCHW fp32"),
    ("data_path", "b  + uint8 tensors, batched Preprocess"),
    ("channels_last", "c  + channels_last"),
    ("amp", "d  + AMP"),
    ("resident", "e  + data resident on the device"),
    ("run", "f  transferbench.run end to end"),
    ("compiled", "g  f + torch.compile"),
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 5, trials: int = 5) -> float:
    """The machine's matrix-multiply rate in the dtype training computes in, measured now: what 'peak' means.
    The best of a few trials, so that a moment of load from other jobs does not pass for the peak."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(trials):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


def train_flops_per_image(model: torch.nn.Module, size: int, device: torch.device) -> tuple[float, float]:
    """3x the counted forward FLOPs (backward = grads of inputs + of weights), and how far FlopCounterMode's
    own count of convolution_backward is from 2x the forward convolutions (it counts depthwise ones as dense)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 3, size, size, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as fwd:
        model(x)
    with FlopCounterMode(display=False) as both:
        model(x).sum().backward()
    model.zero_grad(set_to_none=True)
    counts = {str(k): v for k, v in both.get_flop_counts()["Global"].items()}
    backward_ratio = counts.get("aten.convolution_backward", 0) / max(counts.get("aten.convolution", 1), 1)
    return 3 * fwd.get_total_flops() / 2, backward_ratio


def train_pass(model, opt, batches, device: torch.device, amp: bool) -> float:
    """The one training loop steps a-e share; returns images/s of one pass."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) \
        if amp else nullcontext()
    scaler = torch.amp.GradScaler("cuda") if amp and not torch.cuda.is_bf16_supported() else None
    sync(device)
    seen, t0 = 0, time.perf_counter()
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast:
            loss = F.cross_entropy(model(x).float(), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        seen += len(y)
    sync(device)
    return seen / (time.perf_counter() - t0)


def host_batches(images: torch.Tensor, labels: torch.Tensor, prep, batch: int, device: torch.device, seed: int):
    """Our data path with the uint8 images left in host memory (what `Batches` does for data too large for the
    device): index a batch, copy it, crop/flip/resize/normalise it on the device."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    aug = torch.Generator(device=device).manual_seed(seed + 1)
    for i in range(0, len(order) - batch + 1, batch):
        idx = order[i:i + batch]
        yield prep(images[idx].to(device), augment=True, generator=aug), labels[idx]


def summary(xs: list[float]) -> tuple[float, float, float]:
    return statistics.median(xs), min(xs), max(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="96 px, batch 32, 10 images/class: a pass is 3 batches")
    ap.add_argument("--image-size", type=int, default=None, help="default 128, 96 with --quick")
    ap.add_argument("--batch-size", type=int, default=None, help="default 64, 32 with --quick")
    ap.add_argument("--train-per-class", type=int, default=None, help="default 128, 10 with --quick")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2, help="baseline DataLoader workers")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", action="store_true", help="also step g: transferbench.run with torch.compile")
    args = ap.parse_args()
    from transferbench.host import tune_host_allocator

    tune_host_allocator()  # as `transferbench run` does, for every step alike
    per_class = args.train_per_class or (10 if args.quick else 128)
    size = args.image_size or (96 if args.quick else 128)
    batch = args.batch_size or (32 if args.quick else 64)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    repeats = args.repeats

    work = Path(tempfile.mkdtemp(prefix="tb-bench-tp-"))
    os.environ["TRANSFERBENCH_CACHE"] = str(work / "cache")
    folder, described = subset_folder(work / "data", per_class, 2)
    weights = weights_args()
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    from transferbench import RunConfig, run
    from transferbench.data import Batches, Preprocess, load_dataset
    from transferbench.models import create_model

    loaded = load_dataset(f"folder:{folder}", None, storage_size=size, workers=2)  # decode once, untimed
    train = loaded.train if hasattr(loaded, "train") else loaded[0]  # a Dataset, or (train, test) before 9a6732b
    if hasattr(train.images, "materialize"):  # rows of the decoded store on disk (since 9daf640): one tensor in RAM
        train = type(train)(train.images.materialize(), train.labels, train.classes)

    def fresh_model(channels_last: bool):
        torch.manual_seed(0)
        bundle = create_model("tf_efficientnet_lite0", len(train.classes), weights=weights.get("weights"))
        model = bundle.model.to(device).train()
        if channels_last:
            model.to(memory_format=torch.channels_last)
        return bundle, model, torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

    variants = {}  # key -> (model, optimizer, amp, a function giving one pass's batches)

    bundle, model, opt = fresh_model(False)
    dc = bundle.data_config
    tf = T.Compose([T.Resize(size, interpolation=T.InterpolationMode(dc.interpolation)),
                    T.RandomCrop(size, padding=max(1, size // 8), padding_mode="reflect"),
                    T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(dc.mean, dc.std)])
    loader = torch.utils.data.DataLoader(ImageFolder(str(folder / "train"), transform=tf), batch_size=batch,
                                         shuffle=True, num_workers=args.workers, drop_last=True, pin_memory=cuda,
                                         persistent_workers=args.workers > 0)
    variants["baseline"] = (model, opt, False, lambda r, loader=loader: loader)
    del loader  # only the variant holds it: its workers end with it
    for key, channels_last, amp in (("data_path", False, False), ("channels_last", True, False),
                                    ("amp", True, True)):
        if amp and not cuda:
            continue
        _, model, opt = fresh_model(channels_last)
        prep = Preprocess.build(dc, size, device, channels_last)
        variants[key] = (model, opt, amp, lambda r, prep=prep: host_batches(train.images, train.labels, prep, batch,
                                                                             device, seed=r))
    if cuda:
        _, model, opt = fresh_model(True)
        resident = Batches(train, Preprocess.build(dc, size, device, True), device)
        assert resident.data.images.device.type == "cuda", "too large to be held on the device"

        def resident_pass(r: int, resident=resident):
            return resident.iterate(batch, shuffle=True, augment=True, generator=torch.Generator().manual_seed(r),
                                    aug_generator=torch.Generator(device=device).manual_seed(r + 1), drop_last=True)
        variants["resident"] = (model, opt, True, resident_pass)

    first_epoch_s = {"run": [], "compiled": []}

    def via_run(compile_: bool, r: int, epochs: int) -> list[float]:
        """transferbench.run on the same images; images/s of its training epochs after the first."""
        cfg = RunConfig(dataset=f"folder:{folder}", model="tf_efficientnet_lite0", strategy="full",
                        epochs=epochs, image_size=size, batch_size=batch, val_fraction=0.05, seed=0,
                        device=args.device, compile=compile_, output_dir=str(work / "runs"), workers=2,
                        name=f"run-compile{int(compile_)}-{r}", warmup_epochs=0, **weights)
        run(cfg, progress=False)
        rows = [json.loads(line) for line in (work / "runs" / cfg.name / "metrics.jsonl").read_text().splitlines()]
        rows = [row for row in rows if "images_per_s" in row]
        first_epoch_s["compiled" if compile_ else "run"].append(rows[0]["epoch_time_s"])
        return [row["images_per_s"] for row in rows[1:]]  # the first epoch warms up (and compiles)

    dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else torch.float32
    peak_before = matmul_flops(device, dtype)  # and again at the end: the best of the two is the 'peak'
    keys = list(variants)
    for key in keys:  # warm-up: one untimed pass each (kernels, allocator, DataLoader workers)
        model, opt, amp, batches = variants[key]
        train_pass(model, opt, batches(999), device, amp)
    measured = {key: [] for key in keys + ["run"]}
    for r in range(repeats):  # round-robin in a rotating order, so load on the machine falls on every step alike
        order = keys + ["run"]
        for key in order[r % len(order):] + order[:r % len(order)]:
            if key == "run":  # a 2-epoch run each repeat, its second epoch timed
                measured["run"] += via_run(False, r, 2)
                continue
            model, opt, amp, batches = variants[key]
            measured[key].append(train_pass(model, opt, batches(r), device, amp))
    variants.clear()
    if args.compile:  # one run of 1 + repeats epochs: compiling anew every repeat would cost minutes each
        measured["compiled"] = via_run(True, 0, 1 + repeats)

    _, model, _ = fresh_model(True)
    flops_img, backward_ratio = train_flops_per_image(model, size, device)
    peak = max(peak_before, matmul_flops(device, dtype))

    med = {key: summary(xs)[0] for key, xs in measured.items()}
    ladder = [key for key in ("baseline", "data_path", "channels_last", "amp", "resident") if key in measured]
    previous = {}
    for before, after in zip(ladder, ladder[1:]):
        previous[after] = before
    previous["run"] = ladder[-1]  # the cross-check: run() against the last step measured
    if "compiled" in med:
        previous["compiled"] = "run"

    threads = torch.get_num_threads()
    print(f"data: {described}, {len(train)} training images ({per_class}/class), {size} px, batch {batch}, "
          f"device {device}, {threads} threads, {repeats} repeats, baseline DataLoader workers {args.workers}")
    print(f"{'step':42s} {'median img/s':>12s} {'min-max':>12s}   {'vs previous step':32s} {'vs baseline':18s}")
    why_na = {"amp": "n/a: AMP is CUDA-only", "resident": "n/a: on CPU the data already is in host memory"}
    result = {"device": str(device), "image_size": size, "batch_size": batch, "train_images": len(train),
              "repeats": repeats}

    def ratio(key: str, other: str) -> tuple[float, float, float]:
        """Median (min-max) of the per-repeat ratio: the two passes of one repeat ran close together in time, so
        their ratio is less exposed to the load on the machine than a ratio of medians. g ran on its own: medians."""
        if key == "compiled":
            return (med[key] / med[other],) * 3
        return summary([x / y for x, y in zip(measured[key], measured[other])])

    for key, label in STEPS:
        if key not in measured:
            if key in why_na and not cuda:
                print(f"{label:42s} {why_na[key]}")
                result[f"{key}_img_s"] = None
            continue
        m, lo, hi = summary(measured[key])
        result[f"{key}_img_s"] = round(m, 2)
        result[f"{key}_min_max"] = [round(lo, 2), round(hi, 2)]
        cells = []
        for other in (previous.get(key), "baseline" if key != "baseline" else None):
            if other is None:
                cells.append("")
                continue
            r, r_lo, r_hi = ratio(key, other)
            cells.append(f"{r:.2f}x ({r_lo:.2f}-{r_hi:.2f}) {other if other != 'baseline' else ''}".rstrip())
            result[f"{key}_vs_{other}"] = round(r, 3)
            result[f"{key}_vs_{other}_min_max"] = [round(r_lo, 3), round(r_hi, 3)]
        print(f"{label:42s} {m:12.1f} {f'{lo:.1f}-{hi:.1f}':>12s}   {cells[0]:32s} {cells[1]:18s}")
    for key, secs in first_epoch_s.items():
        if secs:
            print(f"first (untimed) epoch of {key}: median {statistics.median(secs):.1f} s"
                  f"{', compilation included' if key == 'compiled' else ''}")
            result[f"{key}_first_epoch_s"] = round(statistics.median(secs), 2)
    fraction = flops_img * med["run"] / peak
    print(f"training FLOPs/image {flops_img / 1e9:.3f} GFLOP (3x forward); {str(dtype).split('.')[-1]} matmul "
          f"{peak / 1e9:.1f} GFLOP/s (best measured before and after); run() achieves "
          f"{flops_img * med['run'] / 1e9:.1f} GFLOP/s = {fraction:.1%} of it (both suffer from load on the machine)")
    print(f"(FlopCounterMode's own convolution_backward count is {backward_ratio:.0f}x the forward convolutions; "
          f"about 2x is right: it counts depthwise backward as dense, so the 3x-forward estimate is used)")
    result.update(flops_fraction=round(fraction, 4), matmul_gflop_s=round(peak / 1e9, 1),
                  train_gflop_per_image=round(flops_img / 1e9, 4))
    finish(result)


if __name__ == "__main__":
    main()
