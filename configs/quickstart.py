"""Quickstart: FedBiF-1/4 on the built-in 8x8 digits, 10 IID clients, no download needed.

Command:
  python launch.py --config=configs/quickstart.py --workdir=/tmp/quickstart
  python launch.py --config=configs/quickstart.py --workdir=/tmp/quickstart_fedavg \
      --config.algorithm=fedavg
Result (2-core CPU, seed 0): FedBiF-1/4 final test accuracy 0.958 (best 0.958), 1.000 bpp up,
4.000 bpp down, sparsity 0.217, 10.6 MB sent, 18 s wall. FedAvg: 0.986, 32/32 bpp, 127 MB, 12 s.
"""
from fedbif_jax.config import base_config


def get_config():
  c = base_config()
  c.rounds = 30
  c.local_epochs = 2
  c.batch_size = 32
  c.lr = 0.05
  c.lock()
  return c
