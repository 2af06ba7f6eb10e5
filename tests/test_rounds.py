"""`fedbif_jax/rounds.py`: the server's half of a round (`Server`), its ledger (`traffic`) and the
round plan, checked by hand on a tiny model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import small_config
from fedbif_jax import records, rounds, wire
from fedbif_jax.algorithms import get_algorithm
from fedbif_jax.algorithms.base import RoundInfo

CLIENTS = 3
VARIABLES = {"params": {
    "Dense_0": {"kernel": jnp.array([[0.5, -0.5, 1.0], [0.0, 2.0, -1.0]]), "bias": jnp.zeros(3)},
    "Dense_1": {"kernel": jnp.array([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])}}}
NUM_WEIGHTS = 12  # the two kernels: the compressed ("weights") leaves


def _server(algorithm="fedavg"):
  info = RoundInfo(jnp.full((CLIENTS,), 1.0 / CLIENTS), jnp.full((CLIENTS,), 10.0))
  plan = lambda t: rounds.RoundPlan(np.arange(CLIENTS), info, jax.random.key(t),
                                    jax.random.key(100 + t), None, None, None)
  algo = get_algorithm(small_config(algorithm=algorithm, num_clients=CLIENTS))
  return rounds.Server(algo, jax.random.key(0), VARIABLES, plan, NUM_WEIGHTS)


def _uplinks(downlink):
  """Client i sends the downlink's leaves plus i + 1 (FedAvg's uplink is the whole model)."""
  ups = [jax.tree.map(lambda x, i=i: np.asarray(x) + np.float32(i + 1), downlink)
         for i in range(CLIENTS)]
  return ups, jax.tree.map(lambda *xs: jnp.stack(xs), *ups)


def _metrics(loss_sum=(1.0, 2.0, 3.0), count=(2.0, 2.0, 4.0)):
  return {"loss_sum": jnp.asarray(loss_sum, jnp.float32), "count": jnp.asarray(count, jnp.float32)}


def test_fedavg_close_round_averages_the_uplinked_params_and_reports_the_round():
  server = _server()
  assert server.state["params"]["Dense_0"]["kernel"].devices() == {jax.local_devices()[0]}
  rnd = server.open_round(0)
  ups, stacked = _uplinks(rnd.downlink)
  closed = server.close_round(rnd, stacked, rnd.plan.info.weights, _metrics(),
                              evaluate=lambda state: {"test_accuracy": 0.5, "test_loss": 1.5})
  params = jax.device_get(server.eval_variables()["params"])
  for path in (("Dense_0", "kernel"), ("Dense_0", "bias"), ("Dense_1", "kernel")):
    leaf = lambda tree: tree[path[0]][path[1]]
    sent = [np.asarray(VARIABLES["params"][path[0]][path[1]]) + i + 1 for i in range(CLIENTS)]
    np.testing.assert_allclose(leaf(params), np.mean(sent, axis=0), rtol=1e-6)
  assert server.state["params"]["Dense_0"]["kernel"].devices() == {jax.local_devices()[0]}
  assert closed.train_loss == pytest.approx(6.0 / 8.0)
  assert closed.evaluated == {"test_accuracy": 0.5, "test_loss": 1.5}
  assert closed.sparsity == pytest.approx(1 / 12)  # the kernels: one zero among 12 weights
  # The ledger: float32 models both ways, 32 bits per weight; the bytes as wire.encode writes.
  down_bytes = len(wire.encode(jax.device_get(rnd.downlink)))
  up_bytes = sum(len(wire.encode(u)) for u in ups)
  assert closed.traffic == {
      "uplink_bits": 8 * up_bytes, "downlink_bits": 8 * down_bytes * CLIENTS,
      "uplink_bpp": 32.0, "downlink_bpp": 32.0,
      "uplink_total_bpp": 8 * up_bytes / (NUM_WEIGHTS * CLIENTS),
      "downlink_total_bpp": 8 * down_bytes / NUM_WEIGHTS}
  assert closed.traffic == rounds.traffic(rnd.downlink, stacked, NUM_WEIGHTS)


def test_traffic_of_a_known_payload_is_the_hand_computed_bytes():
  """A float32 leaf of n values is n * 4 bytes after its header (which depends on the number of
  dimensions, not on their sizes here: every one is a 1-byte varint): 15 parameters a message."""
  server = _server()
  rnd = server.open_round(0)
  _, stacked = _uplinks(rnd.downlink)
  sent = rounds.traffic(rnd.downlink, stacked, NUM_WEIGHTS)
  empty = jax.tree.map(lambda x: np.zeros((0,) + x.shape[1:], np.float32),
                       jax.device_get(rnd.downlink))
  header = len(wire.encode(empty))
  assert sent["downlink_bits"] == 8 * CLIENTS * (header + 15 * 4)
  assert sent["uplink_bits"] == 8 * CLIENTS * (header + 15 * 4)


@pytest.mark.parametrize("bad", ["train", "test"])
def test_a_non_finite_loss_raises_and_keeps_the_state(bad):
  server = _server()
  before = jax.device_get(server.state)
  rnd = server.open_round(0)
  _, stacked = _uplinks(rnd.downlink)
  metrics = _metrics(loss_sum=(1.0, float("nan"), 3.0)) if bad == "train" else _metrics()
  evaluate = lambda state: {"test_accuracy": 0.1,
                            "test_loss": float("inf") if bad == "test" else 2.0}
  with pytest.raises(rounds.TrainingDiverged, match=r"^round 0: non-finite loss \(train "):
    server.close_round(rnd, stacked, rnd.plan.info.weights, metrics, evaluate)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(server.state), before)


def test_account_false_aggregates_without_host_figures():
  server = _server()
  rnd = server.open_round(0)
  _, stacked = _uplinks(rnd.downlink)
  assert server.close_round(rnd, stacked, rnd.plan.info.weights,
                            _metrics(loss_sum=(float("nan"),) * 3), account=False) is None
  kernel = np.asarray(server.eval_variables()["params"]["Dense_1"]["kernel"])
  np.testing.assert_allclose(kernel, np.asarray(VARIABLES["params"]["Dense_1"]["kernel"]) + 2,
                             rtol=1e-6)


def test_plan_round_is_a_pure_function_of_the_config_and_t(tmp_path):
  config = small_config(num_clients=4, clients_per_round=2)
  job = rounds.build_job(config)
  a, b = rounds.plan_round(config, job, 3), rounds.plan_round(config, job, 3)
  np.testing.assert_array_equal(a.ids, rounds.sample_clients(config.seed, 3, 4, 2))
  np.testing.assert_array_equal(a.idx, b.idx)
  assert a.idx.shape[1] == job.max_steps
  np.testing.assert_allclose(np.asarray(a.info.weights), [0.5, 0.5])
  assert records.read_jsonl(str(tmp_path / "none.jsonl")) == []


@pytest.mark.parametrize("algorithm, rule", [("fedbif", "uniform"), ("fedavg", "data_size"),
                                             ("signsgd", "data_size"), ("dadaquant", "data_size")])
def test_paper_aggregation_weights_are_uniform_for_fedbif_and_data_shares_otherwise(algorithm,
                                                                                   rule):
  # On a Dirichlet split the clients hold different amounts of data; "paper" gives FedBiF Eq. 6's
  # 1/|C^t| and every other algorithm its client's share of the round's data (Sec. 2.1), computed
  # here by hand from the job's shard sizes.
  config = small_config(algorithm=algorithm, aggregation_weights="paper",
                        data__partition="dirichlet", data__mu=0.5, data__min_size=5)
  assert rounds.aggregation_rule(config) == rule
  job = rounds.build_job(config)
  assert len(set(job.sizes.tolist())) > 1
  want = (np.full(4, 0.25) if rule == "uniform" else job.sizes / job.sizes.sum())
  np.testing.assert_allclose(np.asarray(rounds.plan_round(config, job, 0).info.weights), want,
                             rtol=1e-6)


def test_fedbif_rounds_report_the_active_plane_and_how_often_clients_flipped_it():
  """FedBiF-1/4's `round_stats` through `close_round`: round 0 trains the MSB (bit 3). Client 0
  uploads the broadcast MSBs unchanged, client 1 flips Dense_0's 6, client 2 all 12: with
  uniform weights (0 + 6 + 12) / 3 = 6 of the 12 weights' bits differ, a flip rate of 0.5."""
  from fedbif_jax import quant
  from fedbif_jax.pytrees import Bits
  server = _server("fedbif")
  rnd = server.open_round(0)
  sent = {name: quant.to_bits(rnd.downlink["weights"][name]["kernel"].values, 4)[3:4]
                .astype(jnp.int32) for name in VARIABLES["params"]}
  flips = {"Dense_0": (0, 1, 1), "Dense_1": (0, 0, 1)}   # per client: flip this leaf's bits?
  uplinks = {
      "weights": {name: {"kernel": Bits(jnp.stack([jnp.abs(bits - f) for f in flips[name]]),
                                        jnp.asarray(1, jnp.int32))}
                  for name, bits in sent.items()},
      "other": {"Dense_0": {"bias": jnp.zeros((CLIENTS, 3))}}, "model_state": {}}
  closed = server.close_round(rnd, uplinks, rnd.plan.info.weights, _metrics())
  assert closed.stats["active_bits"] == [3]
  assert closed.stats["bit_flip_rate"] == [pytest.approx(0.5)]
  # An algorithm without round statistics adds nothing to the round's row.
  server = _server()
  rnd = server.open_round(0)
  assert server.close_round(rnd, _uplinks(rnd.downlink)[1], rnd.plan.info.weights,
                            _metrics()).stats == {}
