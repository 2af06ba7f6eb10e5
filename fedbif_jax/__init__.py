"""fedbif_jax: communication-efficient federated learning with FedBiF (Federated Bits Freezing).

Entry points: `fedbif_jax.train.train_and_evaluate(config, workdir)` and ``launch.py``.
"""
__version__ = "0.1.0"
