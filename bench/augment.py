"""Each `--augment` policy (and --random-erasing, --mixup/--cutmix) against the default `crop-flip`: images/s of the
batch preprocessing alone (uint8 batch in, normalised float batch at the model's resolution out, on the device), and
what that costs beside one training step of the model it feeds.

    python bench/augment.py                  # CIFAR-10 JPEG copy (32 px) -> 128 px, batch 64, 30 batches x 3 repeats
    python bench/augment.py --quick          # 10 batches x 2 repeats
    python bench/augment.py --device cuda --image-size 224 --batch-size 256

Every variant is timed on the same batches, after one untimed warm-up pass each; the variants alternate over the
repeats (the order reversed every other repeat) so none always runs first. Reported per variant: median images/s
and min-max over repeats, the ratio to crop-flip (median of per-repeat ratios), and the preprocessing time as a
share of one training step (`full` fine-tuning of EfficientNet-Lite0, AdamW, measured the same way in this
process), which is what decides whether a policy slows training down.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import finish, subset_folder  # noqa: E402

VARIANTS = {  # name -> (policy, random erasing, mixup alpha, cutmix alpha)
    "none": ("none", 0.0, 0.0, 0.0),
    "crop-flip": ("crop-flip", 0.0, 0.0, 0.0),
    "rrc": ("rrc", 0.0, 0.0, 0.0),
    "trivialaugment": ("trivialaugment", 0.0, 0.0, 0.0),
    "randaugment": ("randaugment", 0.0, 0.0, 0.0),
    "crop-flip + random-erasing 0.25": ("crop-flip", 0.25, 0.0, 0.0),
    "crop-flip + mixup 0.8 / cutmix 1.0": ("crop-flip", 0.0, 0.8, 1.0),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--batches", type=int, default=None, help="batches per timing (default 30, 10 with --quick)")
    ap.add_argument("--repeats", type=int, default=None, help="default 3, 2 with --quick")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    n_batches = args.batches or (10 if args.quick else 30)
    repeats = args.repeats or (2 if args.quick else 3)

    from timm.data import Mixup

    from transferbench.data import load_dataset
    from transferbench.host import pick_device, tune_host_allocator
    from transferbench.models import create_model, data_config
    from transferbench.preprocess import Preprocess

    tune_host_allocator()
    device = pick_device(args.device)
    work = Path(tempfile.mkdtemp(prefix="tb-bench-augment-"))
    per_class = -(-n_batches * args.batch_size // 10)
    folder, described = subset_folder(work / "data", per_class, 1)
    train = load_dataset(f"folder:{folder}", None, storage_size=args.image_size, workers=2).train
    images = train.images.materialize() if hasattr(train.images, "materialize") else train.images
    batches = [images[i:i + args.batch_size].to(device) for i in range(0, n_batches * args.batch_size,
                                                                       args.batch_size)]
    labels = [train.labels[i:i + args.batch_size].to(device) for i in range(0, n_batches * args.batch_size,
                                                                            args.batch_size)]
    config = data_config("tf_efficientnet_lite0")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def make(name: str):
        policy, erasing, mixup, cutmix = VARIANTS[name]
        prep = Preprocess.build(config, args.image_size, device, channels_last=True, policy=policy,
                                random_erasing=erasing)
        mix = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=0.1, num_classes=10) if (
            mixup or cutmix) else None
        generator = torch.Generator(device=device).manual_seed(0)

        def one(x, y):
            out = prep(x, augment=policy != "none" or erasing > 0, generator=generator)
            if mix is not None:
                out, y = mix(out, y)
            return out
        return one

    def timed(fn) -> float:
        sync()
        t0 = time.perf_counter()
        for x, y in zip(batches, labels):
            fn(x, y)
        sync()
        return n_batches * args.batch_size / (time.perf_counter() - t0)

    fns = {name: make(name) for name in VARIANTS}
    for fn in fns.values():  # warm-up: first kernels, allocator
        timed(fn)
    rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for r in range(repeats):
        order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
        for name in order:
            rates[name].append(timed(fns[name]))

    # One training step of what the batches feed, for scale: full fine-tuning of Lite0, AdamW.
    torch.manual_seed(0)
    bundle = create_model("tf_efficientnet_lite0", 10)  # random weights: a step's speed does not depend on them
    model = bundle.model.to(device).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    plain = Preprocess.build(config, args.image_size, device, channels_last=True, policy="none")
    inputs = [plain(x) for x in batches[:max(3, n_batches // 5)]]

    def step(x, y):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step(inputs[0], labels[0])  # warm-up
    sync()
    t0 = time.perf_counter()
    for x, y in zip(inputs, labels):
        step(x, y)
    sync()
    step_s = (time.perf_counter() - t0) / len(inputs)

    base = rates["crop-flip"]
    print(f"# {described}: {n_batches} batches of {args.batch_size} at 32 px -> {args.image_size} px on {device}, "
          f"{repeats} repeats; one training step of tf_efficientnet_lite0 (full, AdamW): {step_s * 1000:.0f} ms")
    print(f"{'variant':<36} {'images/s (median, min-max)':>30} {'vs crop-flip':>13} {'ms/batch':>9} "
          f"{'share of a step':>16}")
    result = {"bench": "augment", "device": str(device), "image_size": args.image_size, "batch_size":
              args.batch_size, "step_ms": round(step_s * 1000, 1), "variants": {}}
    for name, values in rates.items():
        med = statistics.median(values)
        ratio = statistics.median(v / b for v, b in zip(values, base))
        ms = 1000 * args.batch_size / med
        share = ms / (ms + step_s * 1000)
        print(f"{name:<36} {med:>12,.0f} ({min(values):,.0f}-{max(values):,.0f}) {ratio:>12.2f}x {ms:>9.1f} "
              f"{100 * share:>15.1f}%")
        result["variants"][name] = {"images_per_s": round(med, 1), "min": round(min(values), 1),
                                    "max": round(max(values), 1), "vs_crop_flip": round(ratio, 3),
                                    "ms_per_batch": round(ms, 2), "share_of_step": round(share, 4)}
    finish(result)


if __name__ == "__main__":
    main()
