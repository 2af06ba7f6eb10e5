"""The paper's CIFAR-100 setting: ResNet-34 (CIFAR stem), FedBiF-1/4, 10 clients, 200 rounds.

Sec. 4.1 of the paper: 10 clients, all of them every round, batch 64, 5 local epochs, plain SGD
with lr 0.1, 200 rounds; FedBiF with m = 4 bits, s = 1 active bit (1 bpp up, 4 bpp down).
CIFAR-100 (fine labels) from tensorflow-datasets (``cifar100``, 50,000 train / 10,000 test),
IID shards of 5,000; inputs normalised with the published CIFAR-100 mean/std; random crop
(4-pixel padding) and horizontal flip per client batch. Model: `fedbif_jax/models/resnet.py`
(21,328,292 parameters at 100 classes).

Commands:
  python launch.py --config=configs/cifar100_resnet34.py --workdir=/tmp/c100_r34
  # Non-IID, Dirichlet(0.5) label skew (the paper also runs mu=0.1):
  python launch.py --config=configs/cifar100_resnet34.py --workdir=/tmp/c100_r34_dir05 \
      --config.data.partition=dirichlet --config.data.mu=0.5
  # The shared .npz copy (20,000 train images) instead of tfds:
  python launch.py --config=configs/cifar100_resnet34.py --workdir=/tmp/c100_r34_npz \
      --config.data.source=npz --config.data.path=../shared/data/cifar100.npz
  # Smoke variant (tiny data, 2 clients, 1 round):
  python launch.py --config=configs/cifar100_resnet34.py:smoke --workdir=/tmp/c100_r34_smoke

Cost: every client keeps m = 4 float32 virtual bits per weight between rounds (341 MB per client,
3.4 GB for 10), and each checkpoint holds them all; a full run needs a GPU. Paper result
(Table 1, IID): FedBiF 50.6%, FedAvg 42.8%. Not yet reproduced here.
"""
from fedbif_jax.config import paper_config


def get_config(arg=None):
  return paper_config(arg, config_file="cifar100_resnet34.py", model="resnet34", dataset="cifar100", lr=0.1,
                      rounds=200, augment="crop_flip")
