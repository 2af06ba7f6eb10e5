"""XLA compile options of the programs a run compiles, per platform and kind of program.

XLA's CPU backend (jaxlib 0.10.2) hands some operations to YNNPACK by default ("library
fusions": individual convolutions, individual dots, reductions), which runs each one on a single
thread. Two of those choices are slow for us, each in one kind of program:

* ``train`` (a client's local steps, `fedbif_jax/parallel.py`; evaluation): convolutions. Without
  them in the YNN fusion types they run as Eigen's convolutions over all the intra-op threads,
  and their weight gradients 1.3-4x faster (benchmarks/conv_grad.py times every layer shape both
  ways, docs/PERFORMANCE.md). Reductions stay with YNNPACK (BatchNorm statistics).
* ``server`` (broadcast and aggregation, `fedbif_jax/train.py`): reductions too; a weighted sum
  over the clients' axis is slow as a YNNPACK reduction.

`benchmarks/compile_options.py` on the 2-core CPU (two runs), a FedBiF training step at batch
64: small CNN 48 ms with XLA's defaults, 20-22 ms with ``train``; ResNet-18 2.11-2.23 s, 1.29-1.30 s
with ``train``, 1.83-1.87 s with ``server``'s list. One FedBiF aggregation of ResNet-18 over 4
clients: 457-499 ms with XLA's defaults, 8-10 ms with ``server``. A compile option takes the whole list of fusion types, not an
edit of XLA's default.

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


def jit(fun, program: str = "train", platform: str | None = None, **jit_kwargs):
  """``jax.jit(fun, **jit_kwargs)`` compiled with `compiler_options` for `program` on `platform`
  (default: JAX's default backend). Every program of a run is jitted through this."""
  options = compiler_options(platform or jax.default_backend(), program)
  return jax.jit(fun, compiler_options=options, **jit_kwargs)
