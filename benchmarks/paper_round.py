"""One paper-scale FedBiF round on an accelerator: CIFAR-10 / ResNet-18, vmap vs sequential.

The paper's CIFAR-10 setting: 10 clients, each 5 local epochs over 5,000 images at batch 64
(395 local steps per client), FedBiF with m = 4 bits and s = 1 activated bit. Random images of
that shape stand in for CIFAR-10 (speed does not depend on the pixels). For each backend it times
one warm-up round (compile included) and one more round, takes FLOPs per local step from XLA's
cost analysis, compiled for the host CPU (benchmarks/throughput.step_flops: XLA's GPU count
leaves out the cuDNN convolutions) and reports the achieved TFLOP/s against the
device's measured float32 matmul peak (JAX's default precision, so TF32 on tensor-core GPUs),
and the time a 200-round run would take.

Usage (one GPU; on an H200 each backend took about 2 minutes, compile included:
docs/GPU.md):
  python benchmarks/paper_round.py --out=$OUT/paper_round.json
  python benchmarks/paper_round.py --smoke      # seconds on a CPU: tiny sizes, the small CNN
The last line printed is one JSON object; --out also writes it to a file. Paste the figures into
docs/GPU.md with the device's name (benchmarks/gpu_study.sh runs this and a FedAvg/FedBiF pair).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np


from throughput import bench_ours, peak_gflops

PAPER = {"model": "resnet18", "clients": 10, "per_client": 5000, "epochs": 5, "batch": 64}
SMOKE = {"model": "cnn", "clients": 2, "per_client": 96, "epochs": 1, "batch": 32}
ROUNDS_OF_A_PAPER_RUN = 200


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true", help="tiny sizes and the small CNN (CPU)")
  parser.add_argument("--backends", default="vmap,sequential", help="comma list, in order")
  parser.add_argument("--unroll", type=int, default=4, help="the sequential backend's unroll")
  parser.add_argument("--out", default="", help="also write the JSON result here")
  args = parser.parse_args()
  scale = SMOKE if args.smoke else PAPER
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({jax.default_backend()}), {jax.device_count()} device(s), "
        f"JAX {jax.__version__}", flush=True)

  n = scale["clients"] * scale["per_client"]
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
  y = rng.integers(0, 10, n).astype(np.int32)
  peak = peak_gflops(n=1024 if args.smoke else 8192)
  print(f"peak float32 matmul: {peak / 1e3:.2f} TFLOP/s", flush=True)

  result = {"device": device.device_kind, "platform": jax.default_backend(),
            "jax": jax.__version__, "scale": scale, "peak_tflops": peak / 1e3, "rows": []}
  flops_cache = {}  # one CPU compile of the step for every backend
  for backend in [b for b in args.backends.split(",") if b]:
    t = time.perf_counter()
    row = bench_ours(scale["model"], "fedbif", backend, scale["clients"], scale["per_client"],
                     scale["batch"], scale["epochs"], 1, x, y,
                     unroll=args.unroll if backend == "sequential" else 1, client_devices=1,
                     flops_cache=flops_cache)
    row.update(tflops_per_s=row["gflops_per_s"] / 1e3,
               fraction_of_peak=row["gflops_per_s"] / peak,
               minutes_for_200_rounds=row["round_s"] * ROUNDS_OF_A_PAPER_RUN / 60,
               wall_s=time.perf_counter() - t)
    result["rows"].append(row)
    print(json.dumps(row), flush=True)
    if args.out:  # after every backend, so a run cut off by a time limit keeps its rows
      os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
      with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
