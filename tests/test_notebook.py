"""notebooks/fedbif_colab.ipynb: committed without outputs, and it executes end to end on CPU in
its smoke mode (FEDBIF_NOTEBOOK_SMOKE=1) through nbclient, as a user's kernel would run it."""
import os

import pytest

from conftest import REPO

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = os.path.join(REPO, "notebooks", "fedbif_colab.ipynb")


def test_notebook_is_committed_with_outputs_cleared():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


def test_notebook_runs_in_smoke_mode(monkeypatch):
  monkeypatch.setenv("FEDBIF_NOTEBOOK_SMOKE", "1")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": os.path.join(REPO, "notebooks")}})
  client.execute()
  text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs if o.get("output_type") == "stream")
  assert "running on CPU" in text
  assert "fedbif  final accuracy" in text and "uplink 1.00 bpp  downlink 4.00 bpp" in text
  assert "fedavg  final accuracy" in text and "uplink 32.00 bpp" in text
  assert "fewer bytes than FedAvg" in text
  images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if "image/png" in o.get("data", {})]
  assert images, "the curves cell shows no figure"
