"""notebooks/fedbif_colab.ipynb: committed without outputs, and it executes end to end on CPU in
its smoke mode (FEDBIF_NOTEBOOK_SMOKE=1) through nbclient, as a user's kernel would run it."""
import os
import re

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


@pytest.mark.slow
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
