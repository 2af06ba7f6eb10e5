"""A real client/server deployment of the library's algorithms over Flower (an optional extra).

Modules:

* `payload` - `wire.py` payloads as uint8 arrays and back, the uplink structure the server expects
  in a round, and the validator that turns any malformed client bytes into a one-line
  `PayloadError` (no flwr import);
* `roles` - the server's and a client's part of a round, built from the simulator's own pieces
  (`rounds.build_job`, `rounds.plan_round`, `rounds.Server`, the local training of `client.py`),
  so that a deployment computes the simulator's rounds, plus what is Flower's: the downlink
  message, validating replies, dropping and renormalising, client state files (no flwr import);
* `cache` - a SuperNode's on-disk cache of what a client builds from the config alone (its data
  set, JAX's compiled programs), since Flower starts a ClientApp process per message (no flwr
  import);
* `runconfig` - the Flower App's run config and node config keys, and the library config a run
  config describes (no flwr import);
* `apps` - the Flower ServerApp / ClientApp that carry those bytes (the Flower App that
  ``pyproject.toml`` declares: ``flwr run .``; needs ``requirements-flower.txt``);
* `flower` - the processes and the command line that start a SuperLink, SuperNodes and a run on
  one machine (``python -m fedbif_jax.deploy.flower``).

Nothing in the core library or the quickstart imports this package.
"""
