"""Training throughput: transferbench's own training step vs the usual way, same model, resolution,
batch size and device, measured side by side in one process.

Baseline ("the usual way"): torchvision ImageFolder with per-image PIL transforms (resize, random crop
with padding, flip, ToTensor, normalise), a DataLoader, NCHW float32, a plain loop.
Both are timed over their second pass through the data (the first warms up kernels, allocator and workers).
Ours: `transferbench.run` on the same images: uint8 tensors in memory, crop/flip/resize/normalise in
batches on the device, channels_last. Both: `full` fine-tuning, AdamW, label smoothing 0.1.

    python bench/throughput.py           # EfficientNet-Lite0, 128 px, batch 64, 1,280 training images
    python bench/throughput.py --quick   # under 2 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import finish, subset_folder, weights_args  # noqa: E402


def matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """The machine's matrix-multiply rate in the dtype training computes in, measured now: what 'peak' means."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def train_flops_per_image(model: torch.nn.Module, size: int, device: torch.device) -> float:
    """3x the counted forward FLOPs (backward = grads of inputs + of weights). Not counted directly:
    FlopCounterMode charges depthwise convolution_backward as if it were dense (40x too much here)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(2, 3, size, size, device=device))
    return 3 * counter.get_total_flops() / 2


def baseline_images_per_s(folder: Path, size: int, batch: int, workers: int, device: torch.device, weights: dict) -> float:
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    from transferbench.models import create_model

    torch.manual_seed(0)
    bundle = create_model("tf_efficientnet_lite0", 10, **{k: v for k, v in weights.items() if k == "weights"})
    model = bundle.model.to(device).train()
    dc = bundle.data_config
    tf = T.Compose([T.Resize(size, interpolation=T.InterpolationMode(dc.interpolation)),
                    T.RandomCrop(size, padding=max(1, size // 8), padding_mode="reflect"),
                    T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(dc.mean, dc.std)])
    loader = torch.utils.data.DataLoader(ImageFolder(str(folder / "train"), transform=tf), batch_size=batch, shuffle=True,
                                         num_workers=workers, drop_last=True, persistent_workers=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    for epoch in range(2):  # the first pass warms up (allocator, kernels, worker start-up); the second is timed
        seen = 0
        t0 = time.perf_counter()
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(y)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return seen / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--train-per-class", type=int, default=None)
    ap.add_argument("--workers", type=int, default=2, help="baseline DataLoader workers")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", action="store_true", help="also measure ours with torch.compile")
    args = ap.parse_args()
    from transferbench.host import tune_host_allocator

    tune_host_allocator()  # as `transferbench run` does; the baseline shares the process, so gains it too
    per_class = args.train_per_class or (16 if args.quick else 128)  # x10 classes, x0.95 after validation
    device = torch.device(args.device)

    work = Path(tempfile.mkdtemp(prefix="tb-bench-tp-"))
    os.environ["TRANSFERBENCH_CACHE"] = str(work / "cache")
    folder, described = subset_folder(work / "data", per_class, 2)
    weights = weights_args()
    from transferbench import RunConfig, run
    from transferbench.data import load_dataset

    load_dataset(f"folder:{folder}", None, storage_size=args.image_size, workers=2)  # decode once, untimed

    def ours(compile_: bool) -> float:
        cfg = RunConfig(dataset=f"folder:{folder}", model="tf_efficientnet_lite0", strategy="full", epochs=2,
                        image_size=args.image_size, batch_size=args.batch_size, val_fraction=0.05, seed=0,
                        device=args.device, compile=compile_, output_dir=str(work / "runs"),
                        name=f"ours-compile{int(compile_)}", warmup_epochs=0, **weights)
        run(cfg, progress=False)
        last = (work / "runs" / cfg.name / "metrics.jsonl").read_text().splitlines()[-1]
        return json.loads(last)["images_per_s"]  # the second epoch, as for the baseline

    ours_img_s = ours(False)
    baseline_img_s = baseline_images_per_s(folder, args.image_size, args.batch_size, args.workers, device, weights)
    compiled_img_s = ours(True) if args.compile else None

    from transferbench.models import create_model

    model = create_model("tf_efficientnet_lite0", 10).model.to(device).train()
    flops_img = train_flops_per_image(model, args.image_size, device)
    from transferbench.training import autocast_dtype

    dtype = autocast_dtype(device) if device.type == "cuda" else torch.float32  # run() uses AMP on CUDA only
    peak = matmul_flops(device, dtype)
    fraction = flops_img * ours_img_s / peak
    print(f"data: {described}, {per_class}/class, {args.image_size} px, batch {args.batch_size}, device {device}, "
          f"{torch.get_num_threads()} threads")
    print(f"baseline (ImageFolder + PIL transforms + DataLoader({args.workers} workers), NCHW): {baseline_img_s:7.1f} img/s")
    print(f"transferbench (uint8 tensors, batched device aug, channels_last): {ours_img_s:7.1f} img/s "
          f"({ours_img_s / baseline_img_s:.2f}x)")
    if compiled_img_s:
        print(f"transferbench + torch.compile: {compiled_img_s:7.1f} img/s ({compiled_img_s / ours_img_s:.2f}x of eager)")
    print(f"training FLOPs/image {flops_img / 1e9:.3f} GFLOP; {str(dtype).split('.')[-1]} matmul peak {peak / 1e9:.1f} GFLOP/s; "
          f"achieved {flops_img * ours_img_s / 1e9:.1f} GFLOP/s = {fraction:.1%} of peak")
    result = {"baseline_img_s": round(baseline_img_s, 2), "ours_img_s": round(ours_img_s, 2),
              "speedup": round(ours_img_s / baseline_img_s, 3), "flops_fraction": round(fraction, 4)}
    if compiled_img_s:
        result["ours_compiled_img_s"] = round(compiled_img_s, 2)
    finish(result)


if __name__ == "__main__":
    main()
