"""Data pipeline: dataset loading, client partitioning, batch schedules and augmentation."""

from fedbif_jax.data.augment import augment_batch
from fedbif_jax.data.augment import AUGMENTATIONS
from fedbif_jax.data.augment import normalize
from fedbif_jax.data.augment import random_crop_flip
from fedbif_jax.data.batching import compact_schedule
from fedbif_jax.data.batching import eval_batches
from fedbif_jax.data.batching import pad_steps
from fedbif_jax.data.batching import round_batches
from fedbif_jax.data.batching import steps_per_epoch
from fedbif_jax.data.partition import describe_partition
from fedbif_jax.data.partition import dirichlet_partition
from fedbif_jax.data.partition import iid_partition
from fedbif_jax.data.partition import partition
from fedbif_jax.data.partition import PARTITIONS
from fedbif_jax.data.sources import check_labels
from fedbif_jax.data.sources import channel_stats
from fedbif_jax.data.sources import Dataset
from fedbif_jax.data.sources import load_dataset
from fedbif_jax.data.sources import NORMALIZATIONS
from fedbif_jax.data.sources import SOURCES

__all__ = [
    "AUGMENTATIONS",
    "NORMALIZATIONS",
    "PARTITIONS",
    "SOURCES",
    "Dataset",
    "augment_batch",
    "channel_stats",
    "check_labels",
    "compact_schedule",
    "describe_partition",
    "dirichlet_partition",
    "eval_batches",
    "iid_partition",
    "load_dataset",
    "normalize",
    "pad_steps",
    "partition",
    "random_crop_flip",
    "round_batches",
    "steps_per_epoch",
]
