"""Round throughput of fedbif_jax against the machine's peak and a PyTorch FedAvg peer.

Measures, in one process (so that ratios compare like with like on a shared machine):

1. peak: a large jitted float32 matmul (GFLOP/s);
2. ours: FedAvg and FedBiF-1/4 rounds (broadcast, all clients' local steps, aggregate) on random
   CIFAR-shaped data, for the small CNN and ResNet-18, on every client-parallel backend;
3. peer: FedAvg the way most FL papers simulate it, in PyTorch: one model, clients trained one
   after another (load the global weights, SGD steps, keep a copy), then an average. Identical
   CNN, data shapes, batch, steps and clients.

FLOPs per local step come from XLA's compiled cost analysis of one jitted step (forward,
backward, update), the same count used for PyTorch (identical model and batch).

The CPU is split into one host device per core first (``--cpu_devices``, as launch.py does), and
the sequential backend is timed on one device and on all of them. Also measured: the models' 3x3
convolutions under XLA's default CPU options and under `fedbif_jax.xla_options` (which our
programs use; benchmarks/conv_grad.py), and device memory with 20 vs 1,000 clients.

Usage:
  python benchmarks/throughput.py --quick      # a few minutes on 2 CPU cores
  python benchmarks/throughput.py              # more clients, steps and repeats
PyTorch is optional (pip install torch==2.13.0); without it the peer column is skipped.
The last line printed is one JSON object with the headline ratios. The report is written to
docs/PERFORMANCE.md (``--out`` to change).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax


import conv_grad  # benchmarks/, this script's directory
from fedbif_jax import devices as devices_lib
from fedbif_jax import parallel
from fedbif_jax import rounds as rounds_lib
from fedbif_jax.algorithms import get_algorithm
from fedbif_jax.algorithms.base import RoundInfo
from fedbif_jax.client import Batches, TrainData, make_local_training
from fedbif_jax.config import base_config
from fedbif_jax.data import round_batches
from fedbif_jax.models import MODELS, get_model

MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
STD = np.array([0.2470, 0.2435, 0.2616], np.float32)


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def peak_gflops(n: int = 2048, repeats: int = 10) -> float:
  """Measured float32 matmul throughput: the machine's practical peak."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best / 1e9


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step_flops(local, downlink, state, key, part: np.ndarray, batch: int, x: np.ndarray,
               y: np.ndarray) -> float:
  """FLOPs of one local step (forward, backward, update) from XLA's cost analysis, counted on
  the host CPU whatever the backend: XLA's GPU cost analysis leaves out the convolutions (cuDNN
  custom calls): on an H200 it counted 1.3 of ResNet-18's 187 GFLOP per step of 64."""
  cpu = jax.devices("cpu")[0]
  idx, mask = round_batches([part], batch, 1, np.random.default_rng(0))
  args = jax.device_put((downlink, local.start(downlink, state, key), TrainData(x, y),
                         Batches(jnp.asarray(idx[0]), jnp.asarray(mask[0])), key), cpu)
  step = jax.jit(local.steps, static_argnames="num_steps").lower(*args, num_steps=1).compile()
  cost = step.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)) if cost else 0.0


def bench_ours(model_name: str, algorithm: str, backend: str, clients: int, per_client: int,
               batch: int, epochs: int, rounds: int, x: np.ndarray, y: np.ndarray,
               unroll: int = 1, client_devices: int = 0,
               flops_cache: dict | None = None) -> dict:
  """Times `rounds` rounds after one warm-up round (whose extra time is the compile time);
  a backend whose warm-up round takes over 20 s gets one timed round. `unroll` and
  `client_devices` are the sequential backend's (0: all local devices). `flops_cache` keeps
  `step_flops` by (model, algorithm, batch) across calls: the step is the same program on every
  backend, and counting it means compiling it for the CPU (minutes for ResNet-18)."""
  config = base_config()
  config.algorithm = algorithm
  config.lr = 0.05
  model = get_model(model_name, 10)
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(
      jax.random.key(0))
  algo = get_algorithm(config)
  local = make_local_training(algo, model, optax.sgd(config.lr), MEAN, STD)
  runner = parallel.make_runner(backend, local, unroll, client_devices)
  data = runner.place(TrainData(x, y))
  parts = [np.arange(c * per_client, (c + 1) * per_client) for c in range(clients)]
  states = jax.tree.map(lambda *s: np.stack(s), *[
      jax.device_get(algo.init_client(jax.random.key(c), variables)) for c in range(clients)])
  info = RoundInfo(jnp.full((clients,), 1.0 / clients), jnp.full((clients,), float(per_client)))
  keys = jax.random.split(jax.random.key(2), clients)
  rng = np.random.default_rng(0)

  def plan(t):  # every client, uniform weights, fixed keys; a fresh schedule per round
    idx, mask = round_batches(parts, batch, epochs, rng)
    return rounds_lib.RoundPlan(np.arange(clients), info, jax.random.key(3), jax.random.key(3),
                                idx, mask, keys)

  # The simulator's server (rounds.Server): its jitted programs and the state's placement.
  server = rounds_lib.Server(algo, jax.random.key(1), variables, plan)

  def one_round(t, states):
    rnd = server.open_round(t)
    uplinks, states, metrics = runner.run(rnd.downlink, states, rnd.plan.idx, rnd.plan.mask,
                                          rnd.plan.keys, data)
    server.close_round(rnd, uplinks, rnd.plan.info.weights, metrics, account=False)
    jax.block_until_ready(server.state)
    return states, rnd.plan.idx.shape[1]

  t = time.perf_counter()
  states, steps = one_round(0, states)
  first = time.perf_counter() - t
  times = []
  for r in range(1 if first > 20 else rounds):
    t = time.perf_counter()
    states, steps = one_round(r + 1, states)
    times.append(time.perf_counter() - t)
  round_s = float(np.median(times))

  flops_cache = {} if flops_cache is None else flops_cache
  if (model_name, algorithm, batch) not in flops_cache:
    flops_cache[model_name, algorithm, batch] = step_flops(
        local, server.open_round(0).downlink, jax.tree.map(lambda s: s[0], states), keys[0],
        parts[0], batch, x, y)
  flops_per_step = flops_cache[model_name, algorithm, batch]
  client_steps = clients * steps
  label = backend
  if backend == "sequential":
    used = min(len(parallel.sequential_devices(client_devices)), clients)
    label += f", {used} device{'s' if used > 1 else ''}" + (f", unroll {unroll}" if unroll > 1 else "")
  return {
      "model": model_name, "algorithm": algorithm, "backend": label,
      "round_s": round_s, "compile_s": max(first - round_s, 0.0),
      "client_steps_per_s": client_steps / round_s,
      "images_per_s": client_steps * batch / round_s,
      "gflops_per_s": flops_per_step * client_steps / round_s / 1e9,
      "flops_per_step": flops_per_step,
  }


def bench_torch(clients: int, per_client: int, batch: int, epochs: int, rounds: int,
                x: np.ndarray, y: np.ndarray) -> dict | None:
  """Sequential-client FedAvg in PyTorch with the identical small CNN."""
  try:
    import torch
    from torch import nn
  except ImportError:
    return None
  torch.manual_seed(0)
  net = nn.Sequential(
      nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
      nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
      nn.Flatten(), nn.Linear(4096, 128), nn.ReLU(), nn.Linear(128, 10))
  xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  yt = torch.from_numpy(y.astype(np.int64))
  mean = torch.tensor(MEAN).view(1, 3, 1, 1)
  std = torch.tensor(STD).view(1, 3, 1, 1)
  loss_fn = nn.CrossEntropyLoss()
  rng = np.random.default_rng(0)
  global_state = {k: v.clone() for k, v in net.state_dict().items()}

  def one_round():
    nonlocal global_state
    states = []
    for c in range(clients):
      net.load_state_dict(global_state)
      opt = torch.optim.SGD(net.parameters(), lr=0.05)
      own = np.arange(c * per_client, (c + 1) * per_client)
      for _ in range(epochs):
        perm = rng.permutation(own)
        for s in range(0, len(perm), batch):
          idx = torch.from_numpy(perm[s:s + batch])
          xb = (xt[idx].float() / 255.0 - mean) / std
          opt.zero_grad()
          loss_fn(net(xb), yt[idx]).backward()
          opt.step()
      states.append({k: v.clone() for k, v in net.state_dict().items()})
    global_state = {k: torch.stack([s[k] for s in states]).mean(0) for k in global_state}

  one_round()
  times = []
  for _ in range(rounds):
    t = time.perf_counter()
    one_round()
    times.append(time.perf_counter() - t)
  round_s = float(np.median(times))
  steps = epochs * -(-per_client // batch)
  return {"model": "cnn", "algorithm": "fedavg", "backend": f"torch {torch.__version__}",
          "round_s": round_s, "client_steps_per_s": clients * steps / round_s,
          "images_per_s": clients * steps * batch / round_s, "threads": torch.get_num_threads()}


def bench_many_clients(num_clients: int, per_round: int, rounds: int) -> dict:
  """Memory with many clients: FedBiF on the built-in digits through `train_and_evaluate`;
  client states live on the host, so the device holds one round's clients whatever the total."""
  import tempfile
  from fedbif_jax import train as train_lib
  config = base_config()
  config.num_clients, config.clients_per_round, config.rounds = num_clients, per_round, rounds
  config.local_epochs, config.checkpoint_every, config.data.min_size = 1, 0, 1
  device_bytes = []
  original = train_lib._Store.scatter

  def record(self, ids, stacked):
    original(self, ids, stacked)
    device_bytes.append(sum(x.nbytes for x in jax.live_arrays()))

  train_lib._Store.scatter = record
  try:
    with tempfile.TemporaryDirectory() as workdir:
      train_lib.train_and_evaluate(config, workdir)
      with open(os.path.join(workdir, "metrics.jsonl")) as f:
        last = json.loads(f.readlines()[-1])
  finally:
    train_lib._Store.scatter = original
  return {"num_clients": num_clients, "clients_per_round": per_round, "rounds": rounds,
          "host_client_state_mb": last["client_state_bytes"] / 1e6,
          "clients_with_state": per_round * rounds if num_clients >= per_round * rounds else num_clients,
          "device_live_mb_max": max(device_bytes) / 1e6}


def bench_torch_resnet18_step(batch: int, repeats: int = 3) -> dict | None:
  """PyTorch's own ResNet-18 (CIFAR variant, the same layers as ours) SGD step, for context: how
  much of the matmul peak a second framework reaches on this machine's convolutions."""
  try:
    import torch
    from torch import nn
  except ImportError:
    return None

  class Block(nn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.b1 = nn.BatchNorm2d(cout)
      self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.b2 = nn.BatchNorm2d(cout)
      self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                    if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
      y = torch.relu(self.b1(self.c1(x)))
      return torch.relu(self.b2(self.c2(y)) + self.short(x))

  layers = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
  cin = 64
  for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
    layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
    cin = cout
  net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10))
  opt = torch.optim.SGD(net.parameters(), lr=0.05)
  x = torch.randn(batch, 3, 32, 32)
  y = torch.randint(0, 10, (batch,))
  loss_fn = nn.CrossEntropyLoss()

  def step():
    opt.zero_grad()
    loss_fn(net(x), y).backward()
    opt.step()

  step()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    step()
    best = min(best, time.perf_counter() - t)
  return {"model": "resnet18", "framework": f"torch {torch.__version__}", "step_s": best,
          "threads": torch.get_num_threads()}


def write_report(path: str, args, peak: float, rows: list[dict], torch_row, headline: dict,
                 memory: list[dict], torch_r18: dict | None, conv_rows: list[dict]) -> None:
  lines = [
      "# Performance",
      "",
      f"Measured {datetime.date.today().isoformat()} by `python benchmarks/throughput.py"
      f"{' --quick' if args.quick else ''}` on {cpu_model()}, {os.cpu_count()} cores, "
      f"JAX {jax.__version__} ({jax.default_backend()}, {jax.device_count()} device(s)).",
      "",
      f"Setup: {args.clients} clients x {args.per_client} random CIFAR-shaped images, batch "
      f"{args.batch}, {args.epochs} local epoch(s); a round is broadcast + every client's local "
      f"steps + aggregation; median of {args.rounds} timed rounds after one warm-up round. "
      "GFLOP/s from XLA's compiled cost analysis of one local step.",
      "",
      f"Measured float32 matmul peak: **{peak:.1f} GFLOP/s**.",
      "",
      "| model | algorithm | backend | round s | compile s | client-steps/s | images/s | GFLOP/s | % of peak |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(f"| {r['model']} | {r['algorithm']} | {r['backend']} | {r['round_s']:.2f} | "
                 f"{r['compile_s']:.1f} | {r['client_steps_per_s']:.1f} | {r['images_per_s']:.0f} | "
                 f"{r['gflops_per_s']:.1f} | {100 * r['gflops_per_s'] / peak:.0f}% |")
  if torch_row:
    lines.append(f"| cnn | fedavg | {torch_row['backend']} ({torch_row['threads']} threads), "
                 f"sequential clients | {torch_row['round_s']:.2f} | - | "
                 f"{torch_row['client_steps_per_s']:.1f} | {torch_row['images_per_s']:.0f} | - | - |")
  seq = [r for r in rows if r["model"] == "cnn" and r["backend"].startswith("sequential")]
  vm = [r for r in rows if r["model"] == "cnn" and r["backend"] == "vmap"]
  if seq and vm:
    ratio = min(r["round_s"] for r in vm) / min(r["round_s"] for r in seq)
    lines += ["", f"Per-backend default (`parallel=auto`): on this {jax.default_backend().upper()} "
              f"the vmap round takes {ratio:.1f}x the sequential one (small CNN), so `auto` "
              "resolves to `sequential` on CPU and to `vmap` on GPU/TPU (where one program for all "
              "clients fills the accelerator)."]
  devices = len(parallel.sequential_devices())
  split = {label: [r for r in rows if r["backend"] == label]
           for label in ("sequential, 1 device", f"sequential, {devices} devices")}
  if devices > 1 and all(split.values()):
    ratios = ", ".join(
        f"{one['model']} {one['algorithm']} {many['round_s'] / one['round_s']:.2f}x"
        for one in split["sequential, 1 device"] for many in split[f"sequential, {devices} devices"]
        if (one["model"], one["algorithm"]) == (many["model"], many["algorithm"]))
    lines += ["", f"CPU split into {devices} host devices (`cpu_devices`; launch.py's default is one "
              "per core): the sequential backend runs one client per device at once, so a round "
              f"takes {ratios} the one-device round. The PyTorch peer runs its clients one "
              f"after another on the same {os.cpu_count()} cores ({'' if not torch_row else torch_row['threads']} "
              "intra-op threads); `fedbif_one_device_vs_torch_fedavg` in the headline is the "
              "comparison without the split."]
  r18 = [r for r in rows if r["model"] == "resnet18" and r["algorithm"] == "fedavg"]
  if torch_r18 and r18:
    flops = r18[0]["flops_per_step"]
    ours_step = min(1.0 / r["client_steps_per_s"] for r in r18)
    lines += ["", f"For context, one SGD step of PyTorch's ResNet-18 (same layers, batch {args.batch}, "
              f"{torch_r18['framework']}, {torch_r18['threads']} threads) takes "
              f"{torch_r18['step_s']:.2f} s, i.e. {flops / torch_r18['step_s'] / 1e9:.1f} GFLOP/s "
              f"({100 * flops / torch_r18['step_s'] / 1e9 / peak:.0f}% of the matmul peak, counting "
              f"XLA's FLOPs of the same step); ours: {ours_step:.2f} s per client step in a "
              "FedAvg round."]
  if conv_rows:
    lines += ["", "The models' 3x3 stride-1 convolutions (batch 64; `benchmarks/conv_grad.py`), compiled "
              "with XLA's default CPU options (YNNPACK, one thread per convolution) and with "
              "`fedbif_jax/xla_options.py` (Eigen, all intra-op threads), which the training "
              "programs use:", ""] + conv_grad.table(conv_rows)
  if memory:
    lines += ["", "Memory with many clients (FedBiF, built-in digits, `train_and_evaluate`; client "
              "states on the host, the device holds one round's clients):", "",
              "| clients | per round | rounds | host client states MB | device live MB (max) |",
              "|---|---|---|---|---|"]
    for m in memory:
      lines.append(f"| {m['num_clients']} | {m['clients_per_round']} | {m['rounds']} | "
                   f"{m['host_client_state_mb']:.2f} | {m['device_live_mb_max']:.2f} |")
  lines += ["", f"Peak RSS of the benchmark process: {peak_rss_mb():.0f} MB.", "",
            "Headline (last line of the benchmark's output):", "", "```json",
            json.dumps(headline, indent=2), "```", ""]
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    f.write("\n".join(lines))


def variants(model_name: str, algorithm: str, backends: list[str], quick: bool) -> list[tuple]:
  """(backend, unroll, client_devices) rows to time: the sequential backend on one device and on
  all of them (with unroll 1 and 4 for the small CNN), and the one-program backends."""
  devices = len(parallel.sequential_devices())
  rows = []
  if "sequential" in backends:
    rows += [("sequential", 1, 1)] + ([("sequential", 1, 0)] if devices > 1 else [])
    if model_name == "cnn":  # a ResNet-18 step takes seconds: unroll 1 only
      rows.append(("sequential", 4, 0))
  for backend in ("vmap", "sharded"):
    # Skipped in --quick: vmap of ResNet-18 over clients is a GPU/TPU configuration.
    if backend in backends and not (model_name != "cnn" and quick):
      rows.append((backend, 1, 0))
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="a run of a few minutes")
  parser.add_argument("--backends", default="", help="comma list (default: all that apply)")
  parser.add_argument("--cpu_devices", type=int, default=0,
                      help="host devices the CPU is split into, as launch.py's config.cpu_devices "
                           "(0: one per core, at most 4)")
  parser.add_argument("--out", default="docs/PERFORMANCE.md")
  args = parser.parse_args()
  devices_lib.split_cpu(args.cpu_devices)  # before JAX starts
  args.clients = 4 if args.quick else 10
  args.per_client = 256 if args.quick else 500
  args.batch, args.epochs = 64, 1
  args.rounds = 2 if args.quick else 3
  backends = [b for b in (args.backends.split(",") if args.backends else
                          ["sequential", "vmap"] + (["sharded"] if jax.device_count() > 1 else []))]

  rng = np.random.default_rng(0)
  n = args.clients * args.per_client
  x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
  y = rng.integers(0, 10, n).astype(np.int32)

  peak = peak_gflops()
  print(f"peak float32 matmul: {peak:.1f} GFLOP/s", flush=True)
  rows, flops_cache = [], {}
  models = ["cnn"] + (["resnet18"] if "resnet18" in MODELS else [])
  for model_name in models:
    for algorithm in ("fedavg", "fedbif"):
      for backend, unroll, client_devices in variants(model_name, algorithm, backends, args.quick):
        r = bench_ours(model_name, algorithm, backend, args.clients, args.per_client, args.batch,
                       args.epochs, args.rounds, x, y, unroll=unroll, client_devices=client_devices,
                       flops_cache=flops_cache)
        rows.append(r)
        print(json.dumps(r), flush=True)
  torch_row = bench_torch(args.clients, args.per_client, args.batch, args.epochs, args.rounds, x, y)
  if torch_row:
    print(json.dumps(torch_row), flush=True)

  def best(model, algorithm):
    cands = [r for r in rows if r["model"] == model and r["algorithm"] == algorithm]
    return min(cands, key=lambda r: r["round_s"]) if cands else None

  headline = {"peak_gflops": peak}
  fedbif_cnn, fedavg_cnn = best("cnn", "fedbif"), best("cnn", "fedavg")
  headline["fedbif_vs_fedavg"] = fedbif_cnn["round_s"] / fedavg_cnn["round_s"]
  if torch_row:
    headline["fedbif_vs_torch_fedavg"] = fedbif_cnn["round_s"] / torch_row["round_s"]
    headline["fedavg_vs_torch_fedavg"] = fedavg_cnn["round_s"] / torch_row["round_s"]
  one_device = [r for r in rows if r["model"] == "cnn" and r["algorithm"] == "fedbif"
                and r["backend"] == "sequential, 1 device"]
  if torch_row and one_device:
    headline["fedbif_one_device_vs_torch_fedavg"] = one_device[0]["round_s"] / torch_row["round_s"]
  r18 = best("resnet18", "fedbif")
  if r18:
    headline["resnet18_gflops_fraction_of_peak"] = r18["gflops_per_s"] / peak
    headline["resnet18_fedavg_gflops_fraction_of_peak"] = best("resnet18", "fedavg")["gflops_per_s"] / peak
  torch_r18 = bench_torch_resnet18_step(args.batch) if "resnet18" in models else None
  if torch_r18:
    print(json.dumps(torch_r18), flush=True)
    r18_fedavg = best("resnet18", "fedavg")
    headline["torch_resnet18_gflops_fraction_of_peak"] = (
        r18_fedavg["flops_per_step"] / torch_r18["step_s"] / 1e9 / peak)
  conv_rows = conv_grad.measure(conv_grad.SHAPES[:5] if args.quick else conv_grad.SHAPES)
  print(json.dumps(conv_rows), flush=True)
  memory = [bench_many_clients(n, 10, 3) for n in (20, 1000)]
  for m in memory:
    print(json.dumps(m), flush=True)
  headline["device_live_mb_20_vs_1000_clients"] = [m["device_live_mb_max"] for m in memory]
  headline["peak_rss_mb"] = peak_rss_mb()
  write_report(args.out, args, peak, rows, torch_row, headline, memory, torch_r18, conv_rows)
  print(json.dumps(headline))


if __name__ == "__main__":
  main()
