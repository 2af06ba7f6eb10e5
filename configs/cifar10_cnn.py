"""CIFAR-10 from an .npz file with the small CNN: the engine's real-data check.

10 IID clients with 500 training images each (a seeded subset of 5,000 of the file's training
set), 2 local epochs, batch 64 (the last partial batch of each epoch kept), plain SGD lr 0.05,
uniform aggregation weights, 30 rounds; evaluation on all 10,000 test images. Inputs are
normalised per channel by the training subset's mean and std; no augmentation.

Command (FedBiF-1/4; add --config.algorithm=fedavg for FedAvg):
  python launch.py --config=configs/cifar10_cnn.py --workdir=/tmp/c10_fedbif \
      --config.data.path=../shared/data/cifar10.npz
Result (2-core CPU, seed 0, ~8 min each): FedBiF-1/4 final test accuracy 0.447 (still rising),
1/4 bpp, sparsity 0.235, 103 MB sent; FedAvg 0.529, 32/32 bpp, 1,308 MB sent.
"""
from fedbif_jax.config import base_config


def get_config():
  c = base_config()
  c.data.source = "npz"
  c.data.name = "cifar10"
  c.data.path = ""  # required: --config.data.path=/path/to/cifar10.npz
  c.data.train_subset = 5000
  c.rounds = 30
  c.local_epochs = 2
  c.batch_size = 64
  c.lr = 0.05
  c.lock()
  return c
