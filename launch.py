"""Command-line entry: ``python launch.py --config=configs/x.py --workdir=DIR [--config.a.b=v]``.

A thin shell over `fedbif_jax.train.train_and_evaluate`. Bad input prints one line naming the
field (exit 2); a diverged run prints why (exit 3); neither dumps a traceback.

On CPU it first splits the machine into ``config.cpu_devices`` host devices (default one per core),
so that the sequential backend trains that many clients at once (fedbif_jax/devices.py,
fedbif_jax/parallel.py).

Multi-process (multi-host) runs: start the same command once per process with
``--config.distributed.enabled=True`` and the coordinator's address, the process count and each
process's id (or JAX_COORDINATOR_ADDRESS in the environment; on Cloud TPU, Slurm or Open MPI JAX
detects them, FEDBIF_DISTRIBUTED=1 asks for it). See README, "Deploying".
"""
import logging
import os
import sys

from absl import app
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/quickstart.py.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for metrics, checkpoints and the summary.")


def _one_line(error: BaseException) -> str:
  text = " ".join(str(error).replace("\\n", " ").split()).replace("\\'", "'")
  text = text.strip("'\"")
  if isinstance(error, (AttributeError, KeyError)):  # a misspelt field of a locked config
    field, _, hint = text.partition("'")
    text = f"unknown config field {field!r};{hint}"
  return text


def parse_flags(argv):
  """absl's parsing, with a one-line error and exit 2 for a bad flag, a misspelt config field
  (``--config.fedbif.bitz=8``) or a config file that does not load."""
  try:
    rest = FLAGS(argv)
    if FLAGS.config is not None:
      FLAGS.config.get("seed")  # surfaces a config file that failed to load
    return rest
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    where = f" (overrides: {' '.join(overrides)})" if overrides else ""
    print(f"error: bad command line{where}: {_one_line(e)}", file=sys.stderr)
    sys.exit(2)


def distributed_requested(config, environ=os.environ) -> bool:
  """A multi-process run is asked for by ``config.distributed.enabled`` or the environment
  (JAX_COORDINATOR_ADDRESS, or FEDBIF_DISTRIBUTED=1 to let JAX detect the cluster)."""
  return bool(config.distributed.enabled or environ.get("JAX_COORDINATOR_ADDRESS")
              or environ.get("FEDBIF_DISTRIBUTED") == "1")


def initialize_distributed(config) -> None:
  """jax.distributed.initialize() with the config's fields that are set; the rest come from the
  environment or JAX's cluster detection. Must run before any JAX computation."""
  import jax
  d = config.distributed
  kwargs = {}
  if d.coordinator_address:
    kwargs["coordinator_address"] = d.coordinator_address
  if d.num_processes > 0:
    kwargs["num_processes"] = d.num_processes
  if d.process_id >= 0:
    kwargs["process_id"] = d.process_id
  # CPU processes exchange their clients' results through gloo (a no-op setting on GPU/TPU).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
  if jax.process_index() != 0:  # one progress log per job
    logging.getLogger("fedbif_jax").setLevel(logging.WARNING)
  logging.getLogger("fedbif_jax").info(
      "jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
      jax.process_count(), jax.local_device_count(), jax.device_count())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from fedbif_jax.errors import ConfigError
  if FLAGS.config is None or FLAGS.workdir is None:
    print("error: --config and --workdir are required, e.g. "
          "python launch.py --config=configs/quickstart.py --workdir=/tmp/quickstart", file=sys.stderr)
    sys.exit(2)
  from fedbif_jax import devices
  try:  # before JAX starts: the CPU as `cpu_devices` host devices for the sequential backend
    devices.split_cpu(FLAGS.config.cpu_devices)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if distributed_requested(FLAGS.config):
    try:
      initialize_distributed(FLAGS.config)
    except (RuntimeError, ValueError) as e:
      print(f"error: distributed: jax.distributed.initialize failed: {_one_line(e)}", file=sys.stderr)
      sys.exit(2)
  from fedbif_jax.train import TrainingDiverged, train_and_evaluate
  try:
    train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except TrainingDiverged as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)


def configure_logging() -> None:
  """Our progress lines at INFO on stderr; other libraries' (orbax, absl) at WARNING."""
  absl_logging.set_verbosity(absl_logging.WARNING)
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
  logger = logging.getLogger("fedbif_jax")
  logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  logger.propagate = False


if __name__ == "__main__":
  configure_logging()
  app.run(main, flags_parser=parse_flags)
