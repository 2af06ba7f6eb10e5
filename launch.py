"""Command-line entry: ``python launch.py --config=configs/x.py --workdir=DIR [--config.a.b=v]``.

A thin shell over `fedbif_jax.train.train_and_evaluate`. Bad input prints one line naming the
field (exit 2); a diverged run prints why (exit 3); neither dumps a traceback.
"""
import logging
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from fedbif_jax.errors import ConfigError
  from fedbif_jax.train import TrainingDiverged, train_and_evaluate
  if FLAGS.config is None or FLAGS.workdir is None:
    print("error: --config and --workdir are required, e.g. "
          "python launch.py --config=configs/quickstart.py --workdir=/tmp/quickstart", file=sys.stderr)
    sys.exit(2)
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
