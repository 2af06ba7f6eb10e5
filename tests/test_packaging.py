"""The package as installed (README: ``pip install -r requirements.txt -e .``): importable from any
folder, its command-line modules run from outside the checkout, and no file edits ``sys.path``."""
import os
import subprocess
import sys

from conftest import REPO


def _outside(tmp_path, *args, timeout=300):
  """Runs python with `args` in a folder outside the checkout, without PYTHONPATH."""
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True,
                        text=True, timeout=timeout)


def test_no_file_inserts_into_sys_path():
  tracked = subprocess.run(["git", "ls-files", "*.py", "*.ipynb"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
  assert tracked, "git ls-files found no Python files"
  needles = ["sys.path." + verb for verb in ("insert", "append")]  # split: not matching itself
  offenders = [p for p in tracked
               if any(n in open(os.path.join(REPO, p), encoding="utf-8").read() for n in needles)]
  assert offenders == []


def test_the_installed_package_is_this_checkout_from_any_folder(tmp_path):
  result = _outside(tmp_path, "-c", "import fedbif_jax; print(fedbif_jax.__file__)")
  assert result.returncode == 0, result.stderr
  assert os.path.realpath(result.stdout.strip()) == os.path.realpath(
      os.path.join(REPO, "fedbif_jax", "__init__.py"))


def test_the_flower_cli_runs_from_outside_the_checkout(tmp_path):
  result = _outside(tmp_path, "-m", "fedbif_jax.deploy.flower", "--help")
  assert result.returncode == 0, result.stderr
  assert "usage: python -m fedbif_jax.deploy.flower" in result.stdout


def test_a_config_that_reads_the_study_loads_from_outside_the_checkout(tmp_path):
  # configs/cifar10_study.py needs experiments/ of the checkout, which is not installed.
  path = os.path.join(REPO, "configs", "cifar10_study.py")
  code = ("import importlib.util\n"
          f"spec = importlib.util.spec_from_file_location('study', {path!r})\n"
          "module = importlib.util.module_from_spec(spec)\n"
          "spec.loader.exec_module(module)\n"
          "c = module.get_config('fedavg')\n"
          "print(c.algorithm, c.data.validation, c.rounds)\n")
  result = _outside(tmp_path, "-c", code)
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == ["fedavg", "1000", "100"]
