"""The default configuration every experiment config starts from.

`base_config()` returns an unlocked `ml_collections.ConfigDict` with every field the engine reads;
experiment files in ``configs/`` change what they need and lock it, so a misspelt override such as
``--config.fedbif.bitz=8`` is an error.
"""
from __future__ import annotations

import ml_collections

from fedbif_jax.errors import check


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.algorithm = "fedbif"           # fedavg | fedbif | signsgd | fedpaq | feddq | dadaquant
  c.rounds = 30
  c.num_clients = 10
  c.clients_per_round = 0          # 0: all clients every round (the paper's setting)
  c.local_epochs = 2               # E
  c.batch_size = 64                # B; the last partial batch of each epoch is kept
  c.lr = 0.05                      # plain SGD: no momentum, no weight decay
  c.aggregation_weights = "uniform"  # uniform (Eq. 6 as printed) | data_size (p_k, Sec. 2.1) |
                                   # paper: uniform for fedbif, data_size for the others
  c.eval_batch_size = 1000
  c.eval_every = 1                 # rounds between evaluations (validation and test); the last
                                   # round is always evaluated
  c.eval_test = True               # False: never read the test set (tuning on data.validation)
  c.checkpoint_every = 5           # rounds; 0 disables checkpoints
  c.lipschitz_every = 0            # rounds; > 0: Lipschitz bound + last-layer histogram (Sec. 4.4)
  c.lipschitz_iterations = 50      # power-iteration steps per layer
  c.parallel = "auto"              # auto | sequential | vmap (see fedbif_jax/parallel.py)
  c.unroll = 1                     # local steps per jitted call (sequential backend)
  c.client_devices = 0             # sequential backend: this process's devices a round's clients
                                   # are spread over, client c on device c % D (0: all of them,
                                   # on CPU at most one per core)
  c.cpu_devices = 0                # launch.py, before JAX starts: host devices the CPU is split
                                   # into (0: one per core, at most 4); ignored when XLA_FLAGS
                                   # already sets --xla_force_host_platform_device_count
  c.wire_check_every = 10          # rounds; every k-th round (t % k == 0) encode + decode the
                                   # payloads and fail unless bytes and values match (0: never)
  c.wire_codec = "packed"          # packed (Bits bit-packed at their width) | entropy (each Bits
                                   # leaf ANS-coded under its own histogram where that is shorter;
                                   # the ledger counts the coded bytes, see fedbif_jax/wire.py)

  # Multi-process (multi-host) runs: launch.py calls jax.distributed.initialize() when `enabled`,
  # or when the environment sets JAX_COORDINATOR_ADDRESS or FEDBIF_DISTRIBUTED=1. Empty / 0 / -1
  # fields are left to JAX (JAX_COORDINATOR_ADDRESS; cluster detection on Cloud TPU, Slurm,
  # Open MPI).
  c.distributed = ml_collections.ConfigDict()
  c.distributed.enabled = False
  c.distributed.coordinator_address = ""  # host:port of process 0
  c.distributed.num_processes = 0
  c.distributed.process_id = -1

  c.model = ml_collections.ConfigDict()
  c.model.name = "cnn"

  c.data = ml_collections.ConfigDict()
  c.data.source = "builtin"        # builtin | npz | tfds
  c.data.name = "digits"           # builtin: digits; tfds: a tfds name such as cifar10
  c.data.path = ""                 # npz: path of the .npz file
  c.data.data_dir = ""             # tfds: data_dir of prepared data sets
  c.data.train_subset = 0          # > 0: a seeded random subset of the training set
  c.data.test_subset = 0           # > 0: a seeded random subset of the test set (smoke runs)
  c.data.validation = 0            # > 0: this many training images (seeded by `seed`) held out
                                   # from every client, evaluated as validation_accuracy
  c.data.normalization = "train_stats"  # train_stats (of the training set) | published (per data set)
  c.data.augment = "none"          # none | crop_flip (random crop, 4-pixel padding, + horizontal flip)
  c.data.partition = "iid"         # iid | dirichlet
  c.data.mu = 0.5                  # Dirichlet concentration (dirichlet partition only)
  c.data.min_size = 10             # Dirichlet: redraw until every client has this many samples

  # The algorithms' sections: the only place their hyperparameters' defaults are declared;
  # `algorithms.get_algorithm` unpacks config.<algorithm> into the factory's keyword arguments.
  c.fedbif = ml_collections.ConfigDict()
  c.fedbif.bits = 4                # m, 1..8
  c.fedbif.active_bits = 1         # s, 1..m; must divide m for the sequential selector
  c.fedbif.selector = "sequential"  # sequential | fixed | random | flip_rate (ours, adaptive)
  c.fedbif.order = "msb_first"     # sequential: start at the most (msb_first) or least significant bit
  c.fedbif.fixed_bits = ()         # fixed: bit indices; () = the paper's "third bit" (m - 3)
  c.fedbif.encoding = "offset"     # offset (Eq. 4) | sign_magnitude (the sign-bit ablation)
  c.fedbif.vbi = True              # virtual bits inheritance (False: the "without VBI" ablation)
  c.fedbif.full_precision_first_last = False  # True: the first and last layers' kernels stay
                                   # float32, for every algorithm (read by the engine, not by
                                   # fedbif.make: `algorithms.ENGINE_FIELDS`)
  c.fedbif.bit_lr_scale = 1.0      # the activated virtual bits' SGD step is lr x this (biases and
                                   # BatchNorm keep lr); the paper leaves it at 1
  c.fedbif.bit_step = "uniform"    # uniform | inverse_pow2: bit i's step further scaled by 2^-i
  c.fedbif.bit_init = "fan_in"     # virtual bits' Kaiming std: fan_in (the kernel's) |
                                   # stacked_fan_in (PyTorch's fan-in of a stacked [m, out, ...])
  c.fedbif.step = "max_abs"        # each layer's step alpha: max_abs (Eq. 5, every round) |
                                   # learned (clients train it with LSQ's gradient scale, the
                                   # server averages it; Sec. 6's open idea, see fedbif.py)
  c.fedbif.step_lr_scale = 1.0     # learned only: multiplies LSQ's g = 1/sqrt(N * Q_P) on
                                   # the step's gradient

  # Baselines (fedbif_jax/algorithms/<name>.py): kernels compressed, biases and BatchNorm float32.
  c.signsgd = ml_collections.ConfigDict()
  c.signsgd.server_lr = 0.001      # eta: w <- w + eta * majority_vote, applied by server and clients
  c.signsgd.tie_break = "random"   # sign(0) and tied votes: random (fair coin) | positive (+1)

  c.fedpaq = ml_collections.ConfigDict()
  c.fedpaq.bits = 4                # b, 2..8: update integers in [-(2^(b-1)-1), 2^(b-1)-1], b bpp up
  c.fedpaq.norm = "max"            # quantizer scale: max (max|update|) | l2 (QSGD as in the paper)

  c.feddq = ml_collections.ConfigDict()
  c.feddq.resolution = 0.001       # bits = max(ceil(log2(range / resolution)), 2); 0.005 for ResNet-18
  c.feddq.granularity = "tensor"   # tensor (official code) | model: one range for all kernels
  c.feddq.rounding = "nearest"     # nearest (official code) | stochastic
  c.feddq.max_bits = 16            # cap on the width, 2..16 (codes are uint16)

  c.dadaquant = ml_collections.ConfigDict()
  c.dadaquant.phi = 3              # double q when the loss EMA has not improved for phi rounds;
                                   # 0: rounds // 10 (at least 1), as DAdaQuant's paper suggests
  c.dadaquant.psi = 0.9            # EMA factor of the training loss, [0, 1)
  c.dadaquant.q_min = 1            # levels per sign at the start; bits = ceil(log2(2q + 1))
  c.dadaquant.q_max = 32767        # cap on the levels (int16)
  c.dadaquant.client_adaptive = True  # per-client q_i proportional to data share^(2/3)
  return c


def set_fields(config: ml_collections.ConfigDict, overrides: dict, sep: str = ".") -> None:
  """Sets nested fields in place: ``{"fedbif.bits": 8}`` sets ``config.fedbif.bits`` (``sep``
  splits the path; keyword-argument callers use ``"__"``). A misspelt field of a locked config
  raises, as on the command line."""
  for path, value in overrides.items():
    node = config
    *parents, leaf = path.split(sep)
    for p in parents:
      node = node[p]
    node[leaf] = value


def paper_config(arg, *, config_file: str, model: str, dataset: str, lr: float, rounds: int,
                 augment: str) -> ml_collections.ConfigDict:
  """The paper's setup (Sec. 4.1) for one data set, locked; ``arg == "smoke"`` shrinks it.

  10 clients, all of them every round, batch 64, 5 local epochs, plain SGD, FedBiF with m=4, s=1,
  tfds data with the published normalisation. The baselines as their own papers and code set
  them: client weights ``paper`` (FedBiF's Eq. 6 uniform, FedAvg and the baselines by data share
  p_k as in Sec. 2.1; the same on IID shards), DAdaQuant's phi = rounds / 10 (``phi = 0``, so it
  follows ``--config.rounds``), FedDQ's resolution 0.005 for the ResNets and 0.001 for the
  smaller VGG (its official code: 0.005 for ResNet-18, 0.001 for a small CNN). The smoke
  variant: 2 clients x 16 images, 1 round of 2 steps of 8, 32 test images, no checkpoints, one
  device.

  Not tuned here: the CPU study (`experiments/grid.py`, docs/RESULTS.md) tunes every method on a
  small BatchNorm CNN, and its values (e.g. FedBiF's ``bit_lr_scale`` 4 with ``inverse_pow2``)
  are not evidence for ResNets at 5 local epochs, so these configs keep the paper's lr and
  FedBiF's paper defaults.
  """
  check(arg in (None, "", "smoke"), "config",
        f"'' or 'smoke' (--config=configs/{config_file}:smoke)", arg)
  c = base_config()
  c.algorithm = "fedbif"
  c.model.name = model
  c.data.source = "tfds"
  c.data.name = dataset
  c.data.normalization = "published"
  c.data.augment = augment
  c.num_clients = 10
  c.clients_per_round = 0
  c.rounds = rounds
  c.local_epochs = 5
  c.batch_size = 64
  c.lr = lr
  c.fedbif.bits = 4
  c.fedbif.active_bits = 1
  c.aggregation_weights = "paper"
  c.dadaquant.phi = 0
  c.feddq.resolution = 0.005 if model.startswith("resnet") else 0.001
  if arg == "smoke":
    c.num_clients = 2
    c.rounds = 1
    c.local_epochs = 1
    c.batch_size = 8
    c.data.train_subset = 32
    c.data.test_subset = 32
    c.data.min_size = 1
    c.eval_batch_size = 32
    c.checkpoint_every = 0
    c.client_devices = 1  # a smoke run is mostly compilation, which each device does anew
  c.lock()
  return c
