"""The paper's CIFAR-10 setting: ResNet-18 (CIFAR stem), FedBiF-1/4, 10 clients, 200 rounds.

Sec. 4.1 of the paper: 10 clients, all of them every round, batch 64, 5 local epochs, plain SGD
with lr 0.1, 200 rounds; FedBiF with m = 4 bits, s = 1 active bit (1 bpp up, 4 bpp down).
CIFAR-10 from tensorflow-datasets (``cifar10``, all 50,000 train / 10,000 test images), IID
shards of 5,000; inputs normalised with the published CIFAR-10 mean/std; random crop (4-pixel
padding) and horizontal flip per client batch. Model: `fedbif_jax/models/resnet.py`
(11,173,962 parameters).

Commands:
  python launch.py --config=configs/cifar10_resnet18.py --workdir=/tmp/c10_r18
  # Non-IID, Dirichlet(0.5) label skew (the paper also runs mu=0.1):
  python launch.py --config=configs/cifar10_resnet18.py --workdir=/tmp/c10_r18_dir05 \
      --config.data.partition=dirichlet --config.data.mu=0.5
  # The shared .npz copy (30,000 train images) instead of tfds:
  python launch.py --config=configs/cifar10_resnet18.py --workdir=/tmp/c10_r18_npz \
      --config.data.source=npz --config.data.path=../shared/data/cifar10.npz
  # Smoke variant (tiny data, 2 clients, 1 round; seconds once compiled):
  python launch.py --config=configs/cifar10_resnet18.py:smoke --workdir=/tmp/c10_r18_smoke

Cost: every client keeps m = 4 float32 virtual bits per weight between rounds (179 MB per client,
1.8 GB for 10), and each checkpoint holds them all. Measured on the 2-core CPU machine (shared,
load ~3.5), real CIFAR-10 from the .npz, 10 clients x 2 local steps of 64:
  python launch.py --config=configs/cifar10_resnet18.py --workdir=/tmp/r18 \
      --config.data.source=npz --config.data.path=../shared/data/cifar10.npz --config.rounds=2 \
      --config.local_epochs=1 --config.data.train_subset=1280 --config.checkpoint_every=0
round 1: 213 s (about 22 s of it compilation), round 2: 190 s; per round ~3.8 s per client step
(20 steps) and ~105 s to evaluate the 10,000 test images. A full 200-round run (5 epochs of
5,000 images per client: 400 steps per client per round) needs a GPU. Paper result (Table 1,
IID): FedBiF 81.7%, FedAvg 75.2%. Not yet reproduced here.
"""
from fedbif_jax.config import paper_config


def get_config(arg=None):
  return paper_config(arg, config_file="cifar10_resnet18.py", model="resnet18", dataset="cifar10", lr=0.1,
                      rounds=200, augment="crop_flip")
