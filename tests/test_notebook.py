"""notebooks/fedbif_colab.ipynb: committed without outputs; executed end to end through nbclient,
as a user's kernel runs it, in its smoke mode on 4 CPU devices (so it takes the `sharded` branch
a multi-device runtime takes, and shows its progress lines); stopped with the pip command to run
when the runtime has an accelerator that jax does not see; and its helpers (accelerator probes,
install pins, the backend choice) checked one by one here, in this process, from the notebook's
own cells. The environment variables used are documented in the notebook's first cell."""
import ast
import os
import re
import stat
import sys

import pytest

from conftest import REPO

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = os.path.join(REPO, "notebooks", "fedbif_colab.ipynb")
STEERING = ("FEDBIF_NOTEBOOK_SMOKE", "FEDBIF_NOTEBOOK_ACCELERATOR", "FEDBIF_REPO_URL",
            "JAX_PLATFORMS", "XLA_FLAGS", "COLAB_TPU_ADDR", "TPU_NAME")


def test_notebook_is_committed_with_outputs_cleared():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


def test_notebook_documents_its_environment_variables():
  intro = nbformat.read(NOTEBOOK, as_version=4).cells[0]
  assert intro.cell_type == "markdown"
  code = "\n".join(c.source for c in nbformat.read(NOTEBOOK, as_version=4).cells
                   if c.cell_type == "code")
  for name in ("FEDBIF_NOTEBOOK_SMOKE", "FEDBIF_NOTEBOOK_ACCELERATOR", "FEDBIF_REPO_URL",
               "JAX_PLATFORMS", "xla_force_host_platform_device_count"):
    assert name in intro.source, name
  for name in ("FEDBIF_NOTEBOOK_SMOKE", "FEDBIF_NOTEBOOK_ACCELERATOR", "FEDBIF_REPO_URL",
               "JAX_PLATFORMS"):
    assert name in code, name


def _execute(monkeypatch, env):
  """Runs the notebook in a fresh kernel with `env` (None: unset); returns (notebook, error)."""
  for name in STEERING:
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": os.path.join(REPO, "notebooks")}})
  try:
    client.execute()
  except nbclient.exceptions.CellExecutionError as error:
    return nb, error
  return nb, None


def _streams(nb):
  return [o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
          if o.get("output_type") == "stream"]


@pytest.mark.slow
def test_notebook_runs_sharded_on_four_cpu_devices_in_smoke_mode(monkeypatch):
  # 4 host devices: the branch a TPU v2-8 (8 devices) or a multi-GPU runtime takes. JAX_PLATFORMS
  # keeps jax on the CPU even on a machine with an accelerator, so that this test means the same
  # everywhere (the notebook accepts it: "runs on the CPU on purpose").
  nb, error = _execute(monkeypatch, {
      "FEDBIF_NOTEBOOK_SMOKE": "1", "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  assert error is None, error
  streams = _streams(nb)
  text = "".join(streams)
  assert re.search(r"runtime accelerator: (NONE|TPU|GPU) \(", text), text
  assert re.search(r"jax \S+ on CPU: 4 device\(s\), 4 local, \['cpu'\]", text), text
  assert "client-parallel backend: sharded (the clients of a round split over 4 devices)" in text
  assert "fedbif  final accuracy" in text and "uplink 1.00 bpp  downlink 4.00 bpp" in text
  assert "fedavg  final accuracy" in text and "uplink 32.00 bpp" in text
  # Each run's summary says what it ran on (summary.json's environment).
  assert text.count("(sharded on 4 cpu device(s), ") == 2, text

  # Progress: train_and_evaluate's own round lines, shown while each run goes (before the line
  # the cell prints after it), for both runs, nothing in the notebook silencing them.
  progress = [(i, m.group(1)) for i, s in enumerate(streams)
              for m in re.finditer(r"round (\d)/2  acc [0-9.]+  loss .* eta \S+", s)]
  assert [r for _, r in progress] == ["1", "2", "1", "2"], text
  done = [i for i, s in enumerate(streams) if re.search(r"^(fedbif|fedavg) +final accuracy", s,
                                                        re.M)]
  assert len(done) == 2 and progress[1][0] < done[0] < progress[2][0] and progress[3][0] < done[1]

  # The notebook prints the ratio whatever it is; it must be FedBiF-1/4's on the digits CNN:
  # 52,768 kernel weights and 234 biases (P = 53,002). Per client and round FedAvg sends 4P bytes
  # each way (424,016); FedBiF uploads 1 bit per weight and the biases (6,596 + 936 = 7,532 bytes)
  # and downloads 4 bits per weight, 4 step sizes, the biases and a 1-byte mask (26,384 + 16 +
  # 936 + 1 = 27,337): 34,869 bytes, a ratio of 12.16 before headers. Keys, tags and shapes add
  # at most ~1,000 bytes per client and round to either side: 11.8 to 12.2. (Measured: 27,644 +
  # 7,746 bytes against 2 x 212,214, i.e. 307, 214 and 206 bytes of headers: 11.99.)
  match = re.search(r"FedBiF sent ([0-9.]+)x fewer bytes than FedAvg", text)
  assert match, text
  assert 11.75 <= float(match.group(1)) <= 12.25, match.group(0)
  images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if "image/png" in o.get("data", {})]
  assert images, "the curves cell shows no figure"


@pytest.mark.slow
def test_notebook_stops_when_jax_does_not_see_the_accelerator(monkeypatch):
  """A TPU runtime (FEDBIF_NOTEBOOK_ACCELERATOR=tpu stands in for one) whose jax has no TPU
  backend: the notebook stops before training, naming libtpu and the pip command."""
  import jax
  if jax.default_backend() != "cpu":
    pytest.skip("jax runs on an accelerator here")
  nb, error = _execute(monkeypatch, {"FEDBIF_NOTEBOOK_SMOKE": "1",
                                     "FEDBIF_NOTEBOOK_ACCELERATOR": "tpu"})
  assert error is not None, "the notebook ran on the CPU of a 'TPU' runtime"
  failed = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.get("output_type") == "error"]
  assert len(failed) == 1 and failed[0]["ename"] == "RuntimeError", failed
  message = failed[0]["evalue"]
  assert "This runtime has a TPU (FEDBIF_NOTEBOOK_ACCELERATOR=tpu) but jax sees only the CPU" \
      in message, message
  assert "libtpu" in message and f'pip install "jax[tpu]=={jax.__version__}"' in message, message
  assert "Restart session" in message and "JAX_PLATFORMS=cpu" in message, message
  assert "runtime accelerator: TPU (FEDBIF_NOTEBOOK_ACCELERATOR=tpu)" in "".join(_streams(nb))
  assert not any("final accuracy" in s for s in _streams(nb)), "it trained anyway"


# The helpers, from the notebook's own cells: their functions, imports and constants (no call runs).

@pytest.fixture
def cells(monkeypatch):
  for name in STEERING:
    monkeypatch.delenv(name, raising=False)
  namespace = {"__name__": "notebook", "REPO_DIR": REPO}
  for cell in nbformat.read(NOTEBOOK, as_version=4).cells:
    if cell.cell_type != "code" or cell.source.startswith("%"):
      continue
    kept = [node for node in ast.parse(cell.source).body
            if isinstance(node, (ast.FunctionDef, ast.Import, ast.ImportFrom))
            or (isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) and t.id.isupper()
                                                     for t in node.targets)
                and isinstance(node.value, ast.Tuple))]
    exec(compile(ast.Module(kept, type_ignores=[]), NOTEBOOK, "exec"), namespace)
  return namespace


def test_backend_choice_follows_the_device_count(cells):
  choose = lambda platform, count: cells["choose_parallel"](platform, count)[0]
  assert choose("cpu", 1) == "sequential"
  assert choose("gpu", 1) == "vmap"
  assert choose("tpu", 1) == "vmap"          # a single-chip runtime (v5e-1, v6e-1)
  assert choose("tpu", 8) == "sharded"       # v2-8 / v3-8: 8 cores
  assert choose("tpu", 4) == "sharded"
  assert choose("gpu", 2) == "sharded"
  assert choose("cpu", 4) == "sharded"       # CI's forced host devices


def test_accelerator_override_and_order(cells, monkeypatch):
  detect = cells["detect_accelerator"]
  monkeypatch.setenv("FEDBIF_NOTEBOOK_ACCELERATOR", "GPU")
  assert detect() == ("gpu", "FEDBIF_NOTEBOOK_ACCELERATOR=gpu")
  monkeypatch.setenv("FEDBIF_NOTEBOOK_ACCELERATOR", "none")
  assert detect()[0] is None
  monkeypatch.setenv("FEDBIF_NOTEBOOK_ACCELERATOR", "ipu")
  with pytest.raises(ValueError, match="tpu, gpu or none"):
    detect()
  monkeypatch.delenv("FEDBIF_NOTEBOOK_ACCELERATOR")
  monkeypatch.setitem(cells, "tpu_evidence", lambda: "4 TPU chip(s) on the PCI bus")
  monkeypatch.setitem(cells, "gpu_evidence", lambda: "nvidia-smi: GPU 0")
  assert detect() == ("tpu", "4 TPU chip(s) on the PCI bus")
  monkeypatch.setitem(cells, "tpu_evidence", lambda: None)
  assert detect() == ("gpu", "nvidia-smi: GPU 0")
  monkeypatch.setitem(cells, "gpu_evidence", lambda: None)
  assert detect() == (None, "no TPU or NVIDIA GPU found")


def test_tpu_environment_variables_count_as_a_tpu(cells, monkeypatch):
  monkeypatch.setenv("COLAB_TPU_ADDR", "10.0.0.2:8470")
  assert cells["tpu_evidence"]() == "$COLAB_TPU_ADDR"
  assert cells["detect_accelerator"]()[0] == "tpu"


def _fake_nvidia_smi(tmp_path, monkeypatch, script):
  path = tmp_path / "nvidia-smi"
  path.write_text("#!/bin/sh\n" + script)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)
  monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")


def test_gpu_probe_reads_nvidia_smi(cells, tmp_path, monkeypatch):
  if any(cells["installed"](f"jax-{x}-plugin") for x in ("cuda12", "cuda13")):
    pytest.skip("a jax CUDA plugin is installed here: it decides the extra")
  _fake_nvidia_smi(tmp_path, monkeypatch, (
      'if [ "$1" = "-L" ]; then echo "GPU 0: NVIDIA H200 (UUID: GPU-1)"; echo "GPU 1: NVIDIA H200 '
      '(UUID: GPU-2)"; else echo "| NVIDIA-SMI 580.1   Driver Version: 580.1   CUDA Version: '
      '13.0 |"; fi\n'))
  assert cells["gpu_evidence"]() == "nvidia-smi: GPU 0: NVIDIA H200 (UUID: GPU-1) and 1 more"
  assert cells["cuda_extra"]() == "cuda13"
  _fake_nvidia_smi(tmp_path, monkeypatch, 'echo "CUDA Version: 12.4"\n')
  assert cells["cuda_extra"]() == "cuda12"
  # A driverless runtime's nvidia-smi (Colab CPU) fails: no GPU.
  _fake_nvidia_smi(tmp_path, monkeypatch, 'echo "NVIDIA-SMI has failed"; exit 9\n')
  if not os.path.exists("/proc/driver/nvidia/gpus"):
    assert cells["gpu_evidence"]() is None


def test_backend_problem_names_the_missing_package(cells, tmp_path, monkeypatch):
  problem = cells["jax_backend_problem"]
  assert problem(None, "no TPU or NVIDIA GPU found", "cpu", "0.7.1") is None
  assert problem("tpu", "x", "tpu", "0.7.1") is None
  assert problem("gpu", "x", "gpu", "0.7.1") is None
  monkeypatch.setitem(cells, "installed", lambda name: None)
  message = problem("tpu", "/dev/accel0", "cpu", "0.7.1")
  assert "has a TPU (/dev/accel0) but jax sees only the CPU" in message
  assert "libtpu is not installed" in message and 'pip install "jax[tpu]==0.7.1"' in message
  monkeypatch.setitem(cells, "installed", lambda name: "0.0.19" if name == "libtpu" else None)
  assert "libtpu 0.0.19 is installed but jax 0.7.1 did not start it" in problem(
      "tpu", "x", "cpu", "0.7.1")
  monkeypatch.setitem(cells, "installed", lambda name: None)
  _fake_nvidia_smi(tmp_path, monkeypatch, 'echo "CUDA Version: 12.4"\n')
  message = problem("gpu", "nvidia-smi: GPU 0: Tesla T4", "cpu", "0.7.1")
  assert "jax-cuda12-plugin is not installed" in message
  assert 'pip install "jax[cuda12]==0.7.1"' in message
  monkeypatch.setitem(cells, "installed",
                      lambda name: "0.7.0" if name == "jax-cuda12-plugin" else None)
  assert "jax-cuda12-plugin 0.7.0 is installed but jax 0.7.1 found no GPU" in problem(
      "gpu", "x", "cpu", "0.7.1")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")       # the CPU on purpose
  assert problem("gpu", "x", "cpu", "0.7.1") is None
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")  # asked for the GPU, did not get it
  assert problem("gpu", "x", "cpu", "0.7.1") is not None


def test_install_keeps_the_jax_stack(cells, monkeypatch):
  if sys.version_info >= (3, 11):
    import tomllib
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
      deps = tomllib.load(f)["project"]["dependencies"]
    assert [f"jax{cells['jax_requirement'](REPO)}"] == [d for d in deps
                                                        if re.match(r"jax\s*[<>=!~]", d)]
  requirement = cells["jax_requirement"](REPO)
  assert requirement.startswith(">=")
  minimum = requirement[2:]
  stack = {"jax": minimum, "jaxlib": minimum, "libtpu": "0.0.19", "numpy": "2.0"}
  monkeypatch.setitem(cells, "installed", stack.get)
  pins = cells["jax_stack_pins"]("tpu", requirement)
  assert pins == {"jax": minimum, "jaxlib": minimum, "libtpu": "0.0.19"}
  assert cells["jax_stack_pins"](None, requirement) == pins  # a CPU runtime keeps its jax too
  stack.update(jax="0.5.2", jaxlib="0.5.2")                  # older than the library needs
  with pytest.raises(RuntimeError, match=re.escape(f'pip install -U "jax[tpu]{requirement}"')):
    cells["jax_stack_pins"]("tpu", requirement)
  assert cells["jax_stack_pins"](None, requirement) == {}    # CPU: pip may upgrade it
  command = cells["pip_install_command"](REPO, "/tmp/pins.txt")
  assert command[1:] == ["-m", "pip", "install", "-q", "-e", REPO, "-c", "/tmp/pins.txt"]
  assert not {"-U", "--upgrade", "--force-reinstall"} & set(command)
