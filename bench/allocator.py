"""The host allocator setting `transferbench run` applies on CPU (training.tune_host_allocator), measured:
the same EfficientNet-Lite0 `full` training step in two fresh processes, glibc's default allocator vs
tuned, reporting images/s, kernel (sys) CPU time and resident peak of each.

    python bench/allocator.py           # batch 64 at 128 px, then batch 256 at 160 px
    python bench/allocator.py --quick   # batch 32 at 96 px, under 2 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import json
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    configs = [(32, 96, 3)] if args.quick else [(64, 128, 6), (256, 160, 4)]
    result = {}
    for batch, size, steps in configs:
        base, ours = measure(False, batch, size, steps), measure(True, batch, size, steps)
        for name, r in (("default", base), ("tuned", ours)):
            print(f"batch {batch:3d} @ {size} px, {name:7s} allocator: {r['img_s']:6.1f} img/s, "
                  f"user {r['user_s']:5.1f} s, sys {r['sys_s']:5.1f} s, peak RSS {r['peak_mb']:6.0f} MB")
        result = {"baseline_img_s": round(base["img_s"], 2), "ours_img_s": round(ours["img_s"], 2),
                  "speedup": round(ours["img_s"] / base["img_s"], 3), "baseline_peak_mb": round(base["peak_mb"]),
                  "ours_peak_mb": round(ours["peak_mb"]), "batch_size": batch, "image_size": size}
    finish(result)  # the last (largest) configuration


if __name__ == "__main__":
    main()
