"""The paper's SVHN setting: VGG11-lite, FedBiF-1/4, 10 clients, 100 rounds.

Sec. 4.1 of the paper: 10 clients, all of them every round, batch 64, 5 local epochs, plain SGD
with lr 0.01, 100 rounds; FedBiF with m = 4 bits, s = 1 active bit (1 bpp up, 4 bpp down).
SVHN cropped digits from tensorflow-datasets (``svhn_cropped``: 73,257 train / 26,032 test; the
"extra" split is not used), IID shards; inputs normalised with one published mean/std for all
channels (0.4496 / 0.1995, as the authors' framework); no augmentation (digits must not be
mirrored). Model: `fedbif_jax/models/vgg.py`, VGG11 at 7/8 width with BatchNorm (7,066,818
parameters, the size the paper's "2.6 GB" implies).

Commands:
  python launch.py --config=configs/svhn_vgg11.py --workdir=/tmp/svhn_vgg
  # Non-IID, Dirichlet(0.5) label skew (the paper also runs mu=0.1):
  python launch.py --config=configs/svhn_vgg11.py --workdir=/tmp/svhn_vgg_dir05 \
      --config.data.partition=dirichlet --config.data.mu=0.5
  # Smoke variant (tiny data, 2 clients, 1 round):
  python launch.py --config=configs/svhn_vgg11.py:smoke --workdir=/tmp/svhn_vgg_smoke

SVHN needs preparing once (`pip install tensorflow-cpu`, then the first run downloads and
prepares it, or `tfds build svhn_cropped --file_format=array_record`). Cost: every client keeps
m = 4 float32 virtual bits per weight between rounds (113 MB per client, 1.1 GB for 10). Paper
result (Table 1, IID): FedBiF 92.7%, FedAvg 90.9%. Not yet reproduced here.
"""
from fedbif_jax.config import paper_config


def get_config(arg=None):
  return paper_config(arg, config_file="svhn_vgg11.py", model="vgg11_lite", dataset="svhn_cropped", lr=0.01,
                      rounds=100, augment="none")
