"""The host allocator setting `transferbench run` applies on CPU (transferbench.host.tune_host_allocator), measured:
the same EfficientNet-Lite0 `full` training step (channels_last, float32, AdamW, random inputs) in fresh processes,
glibc's default allocator vs tuned, reporting images/s, kernel (sys) CPU time and resident peak of each.

Each configuration runs --repeats processes each way, alternating (default, tuned, tuned, default, ...), after
one untimed throwaway process (so the first timed one does not pay for cold file caches). Each process times
its steps after two warm-up steps. Reported: median and min-max of each way, and the median (min-max) of the
per-repeat ratio tuned / default.

    python bench/allocator.py           # batch 64 at 128 px (6 steps), then batch 256 at 160 px (4 steps)
    python bench/allocator.py --quick   # batch 32 at 96 px (5 steps): a few minutes on 2 loaded cores
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import finish  # noqa: E402

STEP = r"""
import json, resource, sys, time
import torch, torch.nn.functional as F
from transferbench.models import create_model
from transferbench.host import tune_host_allocator
tuned, batch, size, steps = sys.argv[1] == "1", int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
if tuned:
    assert tune_host_allocator()
torch.manual_seed(0)
model = create_model("tf_efficientnet_lite0", 10).model.to(memory_format=torch.channels_last).train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 10, (batch,))
def step():
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
step(); step()
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for _ in range(steps):
    step()
dt, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"img_s": steps * batch / dt, "user_s": r1.ru_utime - r0.ru_utime, "sys_s": r1.ru_stime - r0.ru_stime,
                  "peak_mb": r1.ru_maxrss / 1024}))
"""


def measure(tuned: bool, batch: int, size: int, steps: int) -> dict:
    out = subprocess.run([sys.executable, "-c", STEP, str(int(tuned)), str(batch), str(size), str(steps)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def spread(xs: list[float]) -> tuple[float, float, float]:
    return statistics.median(xs), min(xs), max(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    configs = [(32, 96, 5)] if args.quick else [(64, 128, 6), (256, 160, 4)]
    measure(False, configs[0][0], configs[0][1], 1)  # throwaway: file caches, first imports
    result = {"repeats": args.repeats, "configs": []}
    for batch, size, steps in configs:
        runs = {"default": [], "tuned": []}
        for r in range(args.repeats):
            for way in (("default", "tuned") if r % 2 == 0 else ("tuned", "default")):
                runs[way].append(measure(way == "tuned", batch, size, steps))
        ratios = [t["img_s"] / d["img_s"] for d, t in zip(runs["default"], runs["tuned"])]
        print(f"batch {batch} @ {size} px, {steps} timed steps per process, {args.repeats} processes each way")
        row = {"batch_size": batch, "image_size": size}
        for way, key in (("default", "baseline"), ("tuned", "ours")):
            img_s, user_s, sys_s, peak = (spread([x[k] for x in runs[way]])
                                          for k in ("img_s", "user_s", "sys_s", "peak_mb"))
            print(f"  {way:7s} allocator: {img_s[0]:6.1f} img/s (min-max {img_s[1]:.1f}-{img_s[2]:.1f}), "
                  f"user {user_s[0]:5.1f} s, sys {sys_s[0]:5.1f} s ({sys_s[1]:.1f}-{sys_s[2]:.1f}) over the timed "
                  f"steps, peak RSS {peak[0]:6.0f} MB ({peak[1]:.0f}-{peak[2]:.0f})")
            row.update({f"{key}_img_s": round(img_s[0], 2), f"{key}_img_s_min_max": [round(img_s[1], 2),
                        round(img_s[2], 2)], f"{key}_user_s": round(user_s[0], 2), f"{key}_sys_s": round(sys_s[0], 2),
                        f"{key}_peak_mb": round(peak[0])})
        m, lo, hi = spread(ratios)
        print(f"  tuned / default, per repeat: median {m:.2f}x (min-max {lo:.2f}-{hi:.2f}x)")
        row.update(speedup=round(m, 3), speedup_min_max=[round(lo, 3), round(hi, 3)])
        result["configs"].append(row)
    finish({**result["configs"][-1], **result})  # top-level keys: the last (largest) configuration


if __name__ == "__main__":
    main()
