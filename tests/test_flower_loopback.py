"""A real Flower deployment on 127.0.0.1, started the way Flower documents it: ``flower-superlink
--insecure``, 3 ``flower-supernode --node-config "partition-id=c num-partitions=3"`` and ``flwr run
<repository> local-deployment --stream --run-config ...`` against the Flower App that
``pyproject.toml`` declares (a connection in the CLI's ``$FLWR_HOME/config.toml``), train 2 rounds
of the quickstart (FedBiF-1/4, one local epoch), and the test checks

(a) the payload bytes that crossed the transport against the ledger the simulator keeps
    (`wire.coded_sizes`, via `rounds.traffic`): the downlink message is sent once per client,
    each uplink is received as sent; 1 bpp up and 4 bpp down over the compressed weights. With
    ``wire_codec=entropy`` (the second case) the messages are entropy-coded: fewer bytes, the
    same equalities, and the coded and entropy bpp of both ledgers agree;
(b) the final global model against `train.train_and_evaluate` (``launch.py``) with the same
    config and seed: the server states of both checkpoints are equal bit for bit (tolerance 0),
    and so are the models `train.load_global` reads from both workdirs. Both run the same jitted
    functions on the same values with the sequential backend (the CPU default); only the
    payloads' route differs (encoded, sent over HTTP, decoded), and the wire format is an exact
    round trip;
(c) summary.json holds the simulator's summary with the same values (but the wall time), plus
    the transport's counts;
(d) the apps ran the code of the submitted bundle (installed under the SuperLink's
    ``$FLWR_HOME/apps``), and from the second round on each client read its data set from its
    SuperNode's cache instead of loading it.

The simulator runs first, in its own process, with the JAX compilation cache the Flower
processes then share: the deployment reuses its compiled programs, which keeps this test near a
minute on 2 busy cores (the match is exact without the cache too, only slower).

Every process is stopped in a ``finally`` (process groups and descendants, SIGKILL after a
grace period), also when an assertion or a timeout fails the test.
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("flwr")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/quickstart.py"
OVERRIDES = ["--config.num_clients=3", "--config.rounds=2", "--config.local_epochs=1"]
RUN_TIMEOUT = 240  # seconds for the whole Flower run (about 60 s on a busy 2-core CPU)


def _alive(pid):
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


def _server_state(workdir):
  """The server state of a workdir's newest checkpoint (the simulator's or a deployment's), one
  numpy array per leaf, named by `jax.tree_util.keystr`."""
  import jax
  import orbax.checkpoint as ocp
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  restored = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore())
  leaves = jax.tree_util.tree_flatten_with_path(restored["server"])[0]
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


def _same_tree(a, b):
  import jax
  return (jax.tree.structure(a) == jax.tree.structure(b)
          and all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b))))


@pytest.mark.slow
@pytest.mark.parametrize("codec", ["packed", "entropy"])
def test_three_clients_over_flower_match_the_simulator_and_the_ledger(tmp_path, codec):
  from fedbif_jax import train
  from fedbif_jax.deploy import flower
  overrides = OVERRIDES + [f"--config.wire_codec={codec}"]
  cache = str(tmp_path / "jax_cache")
  env = lambda name: flower.process_env(str(tmp_path / name), cache)  # its own FLWR_HOME
  port = flower.free_port()
  superlink = f"127.0.0.1:{port}"
  processes, started = [], set()
  try:
    processes.append(flower.start(
        ["flower-superlink", "--insecure", "--port", str(port),
         "--disable-runtime-dependency-installation"], env("superlink"),
        str(tmp_path / "superlink.log")))
    for c in range(3):
      node_config = f"partition-id={c} num-partitions=3 cache-dir='{tmp_path / 'node_cache'}'"
      processes.append(flower.start(
          ["flower-supernode", "--insecure", "--superlink", superlink,
           "--port", str(flower.free_port()), "--node-config", node_config],
          env(f"supernode-{c}"), str(tmp_path / f"supernode-{c}.log")))

    # The simulator (launch.py -> train_and_evaluate) while the Flower processes start.
    sim = subprocess.run([sys.executable, os.path.join(REPO, "launch.py"), f"--config={CONFIG}",
                          f"--workdir={tmp_path / 'sim'}", "--config.checkpoint_every=2"]
                         + overrides, env=env("sim_home"), cwd=REPO, capture_output=True,
                         text=True, timeout=RUN_TIMEOUT)
    assert sim.returncode == 0, sim.stderr[-3000:]
    with open(tmp_path / "sim" / "summary.json") as f:
      sim_summary = json.load(f)

    flower.wait_for_superlink(port, timeout=60, process=processes[0])
    (tmp_path / "cli").mkdir()
    with open(tmp_path / "cli" / "config.toml", "w") as f:  # the CLI's Flower configuration
      f.write(f'[superlink.local-deployment]\naddress = "{superlink}"\ninsecure = true\n')
    run_config = (f"overrides='{' '.join(o[len('--config.'):] for o in overrides)}' "
                  f"workdir='{tmp_path / 'run'}' round-timeout=150.0 node-timeout=60.0")
    runner = flower.start(["flwr", "run", REPO, "local-deployment", "--stream",
                           "--run-config", run_config], env("cli"), str(tmp_path / "run.log"))
    processes.append(runner)  # in its own session too: a timeout stops `flwr run` with it
    returncode = runner.wait(timeout=RUN_TIMEOUT)
  finally:
    for p in processes:
      started.update(flower.descendants(p.pid) + [p.pid])
    flower.stop_processes(processes)
  leftovers = [pid for pid in started if _alive(pid)]
  assert not leftovers, f"processes left running: {leftovers}"
  with open(tmp_path / "run.log") as f:
    run_log = f.read()
  log_tail = run_log[-4000:]
  assert returncode == 0, log_tail
  print("\n".join(line for line in run_log.splitlines()
                  if " round " in line or "registered" in line or "fedbif_jax " in line))

  with open(tmp_path / "run" / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  with open(tmp_path / "sim" / "metrics.jsonl") as f:
    sim_rows = [json.loads(line) for line in f]
  assert len(rows) == len(sim_rows) == 2, log_tail

  # (a) bytes that crossed Flower against the ledger.
  for row, sim in zip(rows, sim_rows):
    counts = {k: row[k] for k in ("downlink_message_bytes", "downlink_bytes_sent",
                                  "uplink_bytes_received", "uplink_bytes_accepted",
                                  "downlink_array_bytes", "uplink_array_bytes")}
    ledger = {"ledger_downlink_bytes": row["downlink_bits"] // 8,
              "ledger_uplink_bytes": row["uplink_bits"] // 8,
              "simulator_downlink_bytes": sim["downlink_bits"] // 8,
              "simulator_uplink_bytes": sim["uplink_bits"] // 8,
              "uplink_bpp": row["uplink_bpp"], "downlink_bpp": row["downlink_bpp"],
              "uplink_total_bpp": row["uplink_total_bpp"],
              "downlink_total_bpp": row["downlink_total_bpp"]}
    message = f"round {row['round']}: sent/received {counts}, ledger {ledger}"
    print(message)
    assert row["accepted"] == [0, 1, 2] and not row["dropped"], message
    assert (row["downlink_bytes_sent"] == 3 * row["downlink_message_bytes"]
            == ledger["ledger_downlink_bytes"] == ledger["simulator_downlink_bytes"]), message
    assert (row["uplink_bytes_received"] == row["uplink_bytes_accepted"]
            == ledger["ledger_uplink_bytes"] == ledger["simulator_uplink_bytes"]), message
    assert all(row[k] == sim[k] for k in ("cumulative_uplink_bytes", "cumulative_downlink_bytes",
                                          "cumulative_bytes")), message
    reported = row["client_reported_bytes"]
    assert sorted(reported) == ["0", "1", "2"], message
    assert all(r["downlink_bytes"] == row["downlink_message_bytes"] for r in reported.values())
    assert sum(r["uplink_bytes"] for r in reported.values()) == row["uplink_bytes_received"]
    assert row["uplink_bpp"] == 1.0 and row["downlink_bpp"] == 4.0, message
    if codec == "packed":
      # Whole messages (headers, step sizes, biases, the mask): a little above 1 and 4 bpp.
      assert 1.0 < row["uplink_total_bpp"] < 1.25 and 4.0 < row["downlink_total_bpp"] < 4.25
      assert not any("coded" in k or "entropy" in k for k in row), message
    else:
      # The 4-bit broadcast codes below 4 bits; the coded weights sit just above their entropy.
      fields = ("uplink_coded_bpp", "downlink_coded_bpp", "uplink_entropy_bpp",
                "downlink_entropy_bpp")
      assert {k: row[k] for k in fields} == {k: sim[k] for k in fields}, message
      assert row["downlink_entropy_bpp"] <= row["downlink_coded_bpp"] < 4.0, message
      assert row["uplink_entropy_bpp"] <= row["uplink_coded_bpp"] <= 1.01, message
      assert row["downlink_total_bpp"] < 4.0 and row["uplink_total_bpp"] < 1.25, message
    # Flower's Array adds its .npy header (128 bytes) to every payload.
    assert 0 < row["downlink_array_bytes"] - row["downlink_bytes_sent"] <= 3 * 256, message
    assert 0 < row["uplink_array_bytes"] - row["uplink_bytes_received"] <= 3 * 256, message

  # (b) the final global model is the simulator's, bit for bit.
  deployed, simulated = _server_state(tmp_path / "run"), _server_state(tmp_path / "sim")
  assert sorted(deployed) == sorted(simulated)
  worst = max(float(np.max(np.abs(deployed[k].astype(np.float64) -
                                  simulated[k].astype(np.float64)))) for k in simulated)
  print(f"final model: {len(simulated)} leaves, max |deployed - simulated| = {worst}; accuracy "
        f"{rows[-1]['test_accuracy']:.4f} (simulator {sim_summary['final_accuracy']:.4f})")
  assert all(np.array_equal(deployed[k], simulated[k]) for k in simulated), worst
  assert [r["test_accuracy"] for r in rows] == [r["test_accuracy"] for r in sim_rows]
  loaded, sim_loaded = train.load_global(str(tmp_path / "run")), train.load_global(
      str(tmp_path / "sim"))
  assert loaded.round == sim_loaded.round == 2
  assert _same_tree(loaded.variables, sim_loaded.variables)

  # (c) the simulator's summary, the same numbers.
  with open(tmp_path / "run" / "summary.json") as f:
    summary = json.load(f)
  same = {k: v for k, v in sim_summary.items() if k != "wall_seconds"}
  assert {k: summary[k] for k in same if k in summary} == same, summary
  assert summary["dropped_uplinks"] == 0 and summary["uplink_array_bytes"] > 0

  # (d) the bundle's code ran, and the clients' data sets came from their cache after round 0.
  code = re.findall(r"fedbif_jax \S+ from (\S+)", run_log)
  assert len(code) == 1 and code[0].startswith(str(tmp_path / "superlink" / "apps") + os.sep), code
  for c in range(3):
    with open(tmp_path / f"supernode-{c}.log") as f:
      notes = re.findall(rf"client {c} round (\d+): .*\(setup [\d.]+s: (.*)\)", f.read())
    assert [t for t, _ in notes] == ["0", "1"], notes
    assert notes[1][1].startswith("data set from "), notes
