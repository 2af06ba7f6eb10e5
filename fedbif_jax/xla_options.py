"""XLA compile options of the programs a run compiles, per platform and kind of program.

XLA's CPU backend (jaxlib 0.10.2) hands some operations to YNNPACK by default ("library
fusions": individual convolutions, individual dots, reductions), which runs each one on a single
thread. Two of those choices are slow for us, each in one kind of program:

* ``train`` (a client's local steps, `fedbif_jax/parallel.py`; evaluation): convolutions. Without
  them in the YNN fusion types they run as Eigen's convolutions over all the intra-op threads,
  and their weight gradients 1.3-4x faster (benchmarks/conv_grad.py times every layer shape both
  ways, docs/PERFORMANCE.md). On the 2-core CPU a FedBiF training step at batch 64 went from 47
  to 27 ms (small CNN) and from 2.16 to 1.19 s (ResNet-18) with it. Reductions stay with YNNPACK:
  without them the ResNet-18 step (BatchNorm statistics) took 1.83 s instead of 1.27 s.
* ``server`` (broadcast and aggregation, `fedbif_jax/train.py`): reductions too. A weighted sum
  over the clients' axis as a YNNPACK reduction took 0.48 s for one FedBiF aggregation of
  ResNet-18 (4 clients), 7 ms without it.

(Figures timed while writing this, on the 2-core CPU; benchmarks/throughput.py times whole
rounds.) A compile option takes the whole list of fusion types, not an edit of XLA's default.

The option is experimental, so it is used only where this jaxlib accepts it (checked once per
platform by compiling a one-line program); elsewhere XLA's defaults apply, only slower.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_YNN_FUSIONS = "xla_cpu_experimental_ynn_fusion_type"
CPU_COMPILER_OPTIONS = {
    "train": {_YNN_FUSIONS: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"},
    "server": {_YNN_FUSIONS: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
}


@functools.cache
def _accepted(platform: str, program: str) -> bool:
  """Whether this jaxlib's compiler for `platform` takes CPU_COMPILER_OPTIONS[program]."""
  try:
    device = jax.local_devices(backend=platform)[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    jax.jit(lambda x: x + 1, compiler_options=CPU_COMPILER_OPTIONS[program]).lower(
        jax.ShapeDtypeStruct((1,), jnp.float32, sharding=sharding)).compile()
    return True
  except Exception:  # noqa: BLE001 (any refusal of the option means: do without it)
    return False


def compiler_options(platform: str, program: str = "train") -> dict | None:
  """Options for a `program` ("train" or "server") on `platform`: CPU_COMPILER_OPTIONS[program]
  on a CPU whose jaxlib accepts them, else None (XLA's defaults)."""
  if program not in CPU_COMPILER_OPTIONS:
    raise ValueError(f"program: must be one of {', '.join(CPU_COMPILER_OPTIONS)}, got {program!r}")
  if platform == "cpu" and _accepted(platform, program):
    return dict(CPU_COMPILER_OPTIONS[program])
  return None
