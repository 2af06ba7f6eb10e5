"""Recorded end-to-end outputs: the regression oracle for any change that should not change results.

Each case is a config file (with its ``:arg``) plus overrides. `run_case` trains it in a fresh
workdir and returns its ``metrics.jsonl`` rows and ``summary.json`` without the wall-clock fields;
`tests/test_golden.py` compares that with ``tests/golden/<case>.json``. A restructuring must leave
every file equal; a deliberate change of behaviour re-records them, and its commit says why:

  python tests/golden_cases.py            # re-records every case (1.5 minutes on the idle 2-core CPU)
  python tests/golden_cases.py fedavg     # only the cases whose name contains "fedavg"

Runs use one device and the simulator's sequential-or-vmap choice of `parallel=auto` under the
test process's 4 forced host devices (conftest.py), so record and test see the same programs.
"""
import importlib.util
import json
import os
import platform
import sys
import tempfile

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=4").strip()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN_DIR = os.path.join(REPO, "tests", "golden")
# Fields that measure the machine, not the algorithm.
WALL_CLOCK_FIELDS = ("wall_seconds", "wall_time_seconds", "seconds", "environment")

_QUICK = {"rounds": 10, "client_devices": 1, "checkpoint_every": 0, "lipschitz_every": 5}
CASES = {
    **{f"quickstart-{name}": ("configs/quickstart.py", None, dict(_QUICK, algorithm=name))
       for name in ("fedbif", "fedavg", "signsgd", "fedpaq", "feddq", "dadaquant")},
    # Dirichlet clients of unequal sizes, partial participation, data-size weights.
    "quickstart-fedbif-dirichlet": ("configs/quickstart.py", None, dict(
        _QUICK, **{"data.partition": "dirichlet", "data.mu": 0.5, "clients_per_round": 6,
                   "aggregation_weights": "data_size"})),
    # The paper's ResNet-18 setup shrunk (2 clients x 16 images), on tfds's mock CIFAR-10.
    "cifar10_resnet18-smoke": ("configs/cifar10_resnet18.py", "smoke", {}),
}


def machine() -> str:
  """The CPU model and jax version: float results are bit-exact only on the same pair."""
  import jax
  model = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), model)
  except OSError:
    pass
  return f"{model}; jax {jax.__version__}"


def load_case_config(name: str):
  """The locked config of case `name` (its file's get_config(arg), then the overrides)."""
  from fedbif_jax.config import set_fields
  path, arg, overrides = CASES[name]
  spec = importlib.util.spec_from_file_location("case_config", os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg) if arg is not None else module.get_config()
  config.unlock()
  set_fields(config, overrides)
  config.lock()
  return config


def _strip(record: dict) -> dict:
  return {k: v for k, v in record.items() if k not in WALL_CLOCK_FIELDS}


def run_case(name: str) -> dict:
  """Trains case `name` in a temporary workdir; returns {"rows", "summary"} without wall clocks."""
  from fedbif_jax.train import train_and_evaluate
  config = load_case_config(name)
  with tempfile.TemporaryDirectory() as workdir:
    if config.data.source == "tfds":
      import tensorflow_datasets as tfds
      with tfds.testing.mock_data(num_examples=40):
        train_and_evaluate(config, workdir)
    else:
      train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      rows = [_strip(json.loads(line)) for line in f]
    with open(os.path.join(workdir, "summary.json")) as f:
      summary = _strip(json.load(f))
  return {"rows": rows, "summary": summary}


def golden_path(name: str) -> str:
  return os.path.join(GOLDEN_DIR, f"{name}.json")


def record(names) -> None:
  os.makedirs(GOLDEN_DIR, exist_ok=True)
  for name in names:
    result = run_case(name)
    result["machine"] = machine()
    with open(golden_path(name), "w") as f:
      json.dump(result, f, indent=1, sort_keys=True)
      f.write("\n")
    print(f"recorded {golden_path(name)}: final {result['summary'].get('final_accuracy')}")


if __name__ == "__main__":
  wanted = sys.argv[1:]
  record([n for n in CASES if not wanted or any(w in n for w in wanted)])
