"""The default configuration every experiment config starts from.

`base_config()` returns an unlocked `ml_collections.ConfigDict` with every field the engine reads;
experiment files in ``configs/`` change what they need and lock it, so a misspelt override such as
``--config.fedbif.bitz=8`` is an error.
"""
from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.algorithm = "fedbif"           # fedavg | fedbif
  c.rounds = 30
  c.num_clients = 10
  c.clients_per_round = 0          # 0: all clients every round (the paper's setting)
  c.local_epochs = 2               # E
  c.batch_size = 64                # B; the last partial batch of each epoch is kept
  c.lr = 0.05                      # plain SGD: no momentum, no weight decay
  c.aggregation_weights = "uniform"  # uniform (Eq. 6 as printed) | data_size (p_k, Sec. 2.1)
  c.eval_batch_size = 1000
  c.checkpoint_every = 5           # rounds; 0 disables checkpoints
  c.parallel = "auto"              # auto | sequential | vmap (see fedbif_jax/parallel.py)
  c.unroll = 1                     # local steps per jitted call (sequential backend)

  c.model = ml_collections.ConfigDict()
  c.model.name = "cnn"

  c.data = ml_collections.ConfigDict()
  c.data.source = "builtin"        # builtin | npz | tfds
  c.data.name = "digits"           # builtin: digits; tfds: a tfds name such as cifar10
  c.data.path = ""                 # npz: path of the .npz file
  c.data.data_dir = ""             # tfds: data_dir of prepared data sets
  c.data.train_subset = 0          # > 0: a seeded random subset of the training set
  c.data.partition = "iid"         # iid | dirichlet
  c.data.mu = 0.5                  # Dirichlet concentration (dirichlet partition only)
  c.data.min_size = 10             # Dirichlet: redraw until every client has this many samples

  c.fedbif = ml_collections.ConfigDict()
  c.fedbif.bits = 4                # m, 1..8
  c.fedbif.active_bits = 1         # s, 1..m; must divide m for the sequential selector
  c.fedbif.selector = "sequential"  # sequential | fixed | random
  c.fedbif.order = "msb_first"     # sequential: start at the most (msb_first) or least significant bit
  c.fedbif.fixed_bits = ()         # fixed: bit indices; () = the paper's "third bit" (m - 3)
  c.fedbif.encoding = "offset"     # offset (Eq. 4) | sign_magnitude (the sign-bit ablation)
  c.fedbif.vbi = True              # virtual bits inheritance (False: the "without VBI" ablation)
  return c
