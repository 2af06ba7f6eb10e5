"""Learning-curve figures (`fedbif_jax.plots`): panels, axes and data, and the several-workdirs
command line, on hand-written metrics rows."""
import json

import pytest

from conftest import small_config
from fedbif_jax import plots


def _rows(accuracies, mb_per_round, eval_every=1):
  rows = []
  for t, acc in enumerate(accuracies):
    row = {"round": t, "train_loss": 2.0 - 0.1 * t,
           "cumulative_bytes": mb_per_round * 1e6 * (t + 1)}
    if (t + 1) % eval_every == 0:
      row.update(test_accuracy=acc, test_loss=1.5 - 0.1 * t)
    rows.append(row)
  return rows


def test_three_panels_with_loss_and_a_log_megabyte_axis():
  runs = {"fedbif": _rows([0.1, 0.2, 0.3, 0.4], 0.5, eval_every=2),
          "fedavg": _rows([0.2, 0.4, 0.5, 0.6], 8.0)}
  fig = plots.figure(runs, "t")
  acc, loss, mb = fig.axes
  assert mb.get_xscale() == "log" and acc.get_xscale() == "linear"
  fedbif_acc, fedavg_acc = acc.get_lines()
  assert list(fedbif_acc.get_xdata()) == [2, 4] and list(fedbif_acc.get_ydata()) == [0.2, 0.4]
  assert list(fedavg_acc.get_ydata()) == [0.2, 0.4, 0.5, 0.6]
  labels = [l.get_label() for l in loss.get_lines()]
  assert labels == ["fedbif: test loss", "fedbif: train loss", "fedavg: test loss",
                    "fedavg: train loss"]
  assert list(loss.get_lines()[1].get_ydata()) == pytest.approx([2.0, 1.9, 1.8, 1.7])
  assert list(mb.get_lines()[0].get_xdata()) == pytest.approx([1.0, 2.0])   # evaluated rounds
  assert list(mb.get_lines()[1].get_xdata()) == pytest.approx([8.0, 16.0, 24.0, 32.0])


def test_validation_accuracy_when_the_test_set_was_never_read():
  rows = [{"round": 0, "train_loss": 1.0, "cumulative_bytes": 1e6, "validation_accuracy": 0.3,
           "validation_loss": 1.2}]
  acc, loss, _ = plots.figure({"run": rows}).axes
  assert acc.get_ylabel() == "validation accuracy"
  assert loss.get_lines()[0].get_label() == "run: validation loss"


def test_run_title_names_method_model_data_and_partition():
  config = small_config(data__partition="dirichlet", data__mu=0.1, fedbif__bits=8,
                        fedbif__active_bits=2)
  assert plots.run_title(config) == "fedbif-2/8, cnn, digits dirichlet(0.1)"
  assert plots.run_title(small_config(algorithm="fedavg")) == "fedavg, cnn, digits iid"


def _workdir(path, rows):
  path.mkdir()
  with open(path / "metrics.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
    f.write('{"round": 9, "torn')   # a torn last line is left out
  return str(path)


def test_command_line_plots_several_workdirs(tmp_path, capsys):
  a = _workdir(tmp_path / "fedbif", _rows([0.1, 0.3], 0.5))
  b = _workdir(tmp_path / "fedavg", _rows([0.2, 0.4], 8.0))
  out = tmp_path / "compare.png"
  assert plots.main([a, b, f"--out={out}"]) == 0
  assert out.stat().st_size > 1000
  assert len(plots.read_rows(a)) == 2
  assert plots.main([a, b, f"--out={out}", "--labels=one"]) == 2
  assert plots.main([str(tmp_path / "none"), f"--out={out}"]) == 2
  errors = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
  assert errors == ["error: --labels: must give 2 labels (one per workdir), got 1",
                    f"error: workdir: {str(tmp_path / 'none')!r} has no metrics.jsonl"]

