"""The baselines SignSGD, FedPAQ, FedDQ and DAdaQuant: hand-computed quantizers and aggregation,
their config errors, and 2-round engine runs on the built-in digits with the wire check on."""
import json
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import small_config
from fedbif_jax import quant
from fedbif_jax.algorithms import dadaquant, feddq, fedpaq, get_algorithm, signsgd
from fedbif_jax.algorithms.base import LocalState, RoundInfo
from fedbif_jax.config import base_config
from fedbif_jax import rounds
from fedbif_jax.errors import ConfigError
from fedbif_jax.train import train_and_evaluate
from fedbif_jax.pytrees import Bits


def _tiny_variables():
  """A two-leaf "model": one kernel [2, 3] and one bias [3]."""
  return {"params": {"Dense_0": {"kernel": jnp.array([[0.5, -0.5, 1.0], [0.0, 2.0, -1.0]]),
                                 "bias": jnp.array([0.1, 0.2, 0.3])}}}


def _stack(*trees):
  return jax.tree.map(lambda *x: jnp.stack(x), *trees)


# ----------------------------------------------------------------------------- SignSGD


def test_majority_vote_of_three_clients():
  bits = jnp.array([[1, 0, 1, 0], [1, 1, 0, 0], [0, 0, 1, 1]], jnp.uint8)   # 1 means +1
  # sums: +1+1-1 = 1, -1+1-1 = -1, +1-1+1 = 1, -1-1+1 = -1
  np.testing.assert_array_equal(signsgd.majority_vote(bits, None, "positive"), [1, 0, 1, 0])


def test_sign_bits_zero_and_ties():
  x = jnp.array([0.3, -2.0, 0.0])
  np.testing.assert_array_equal(signsgd.sign_bits(x, None, "positive"), [1, 0, 1])
  zeros = signsgd.sign_bits(jnp.zeros(10000), jax.random.key(0), "random")
  assert 0.47 < float(jnp.mean(zeros)) < 0.53            # a fair coin, no drift
  tied = jnp.array([[1] * 1000, [0] * 1000], jnp.uint8)    # two clients disagree everywhere
  assert 0.45 < float(jnp.mean(signsgd.majority_vote(tied, jax.random.key(1), "random"))) < 0.55
  np.testing.assert_array_equal(signsgd.majority_vote(tied, None, "positive"), 1)


def test_signsgd_round_keeps_clients_and_server_identical():
  algo = get_algorithm(small_config(algorithm="signsgd", num_clients=3, signsgd__server_lr=0.25,
                                    signsgd__tie_break="positive"))
  variables = _tiny_variables()
  server = algo.init(jax.random.key(0), variables)
  info = RoundInfo(jnp.full((3,), 1 / 3), jnp.full((3,), 10.0))
  down0 = algo.broadcast(server, jax.random.key(1), info)
  assert float(down0["step"]) == 0.0                       # nothing to apply in round 0
  states = [algo.init_client(jax.random.key(c), variables) for c in range(3)]
  moves = [jnp.array([[1., 1., -1.], [1., 0., 1.]]), jnp.array([[1., -1., -1.], [-1., 0., 1.]]),
           jnp.array([[-1., -1., 1.], [-1., 0., 1.]])]
  ups, new_states = [], []
  for c in range(3):
    local = algo.client_start(down0, states[c], jax.random.key(5))
    chex.assert_trees_all_equal(local.trainable, variables["params"])
    moved = jax.tree.map(lambda x: x, local.trainable)
    moved["Dense_0"]["kernel"] = moved["Dense_0"]["kernel"] + 0.01 * moves[c]
    moved["Dense_0"]["bias"] = moved["Dense_0"]["bias"] + c
    up, st = algo.client_finish(down0, states[c], LocalState(moved, {}), jax.random.key(6), {})
    ups.append(up)
    new_states.append(st)
  # column sums of the signs: [+1, -1, -1], [-1, 0 (all three zero: sign(0) -> +1 each), +3]
  new = algo.aggregate(server, down0, _stack(*ups), info.weights, None)
  vote = jnp.array([[1., -1., -1.], [-1., 1., 1.]])
  np.testing.assert_allclose(new["params"]["Dense_0"]["kernel"],
                             variables["params"]["Dense_0"]["kernel"] + 0.25 * vote)
  np.testing.assert_allclose(new["params"]["Dense_0"]["bias"], jnp.array([1.1, 1.2, 1.3]))
  down1 = algo.broadcast(new, jax.random.key(2), info)
  assert float(down1["step"]) == 0.25
  for c in range(3):
    local = algo.client_start(down1, new_states[c], jax.random.key(7))
    chex.assert_trees_all_equal(local.trainable, new["params"])   # bit for bit


def test_signsgd_refuses_partial_participation():
  with pytest.raises(ConfigError, match=r"^clients_per_round: .*signsgd"):
    get_algorithm(small_config(algorithm="signsgd", clients_per_round=2))


# ----------------------------------------------------------------------------- FedPAQ


def test_fedpaq_levels_and_widths():
  assert [fedpaq.levels_for_bits(b) for b in (2, 3, 4, 8)] == [1, 3, 7, 127]
  assert [int(quant.level_width(fedpaq.levels_for_bits(b))) for b in (2, 3, 4, 8)] == [2, 3, 4, 8]


def test_fedpaq_aggregates_dequantized_updates():
  algo = get_algorithm(small_config(algorithm="fedpaq", fedpaq__bits=3))   # L = 3
  variables = _tiny_variables()
  server = algo.init(jax.random.key(0), variables)
  down = algo.broadcast(server, jax.random.key(1), RoundInfo(jnp.ones(2) / 2, jnp.ones(2)))
  q = {"Dense_0": {"kernel": Bits(jnp.array([[[3, 0, -3], [1, 1, 1]], [[0, 3, 3], [-1, 0, 2]]],
                                            jnp.int8), jnp.array([3, 3], jnp.int32))}}
  uplinks = {"weights": q, "scale": {"Dense_0": {"kernel": jnp.array([0.3, 0.6])}},
             "other": {"Dense_0": {"bias": jnp.array([[0., 0., 0.], [1., 1., 1.]])}},
             "model_state": {}}
  new = algo.aggregate(server, down, uplinks, jnp.array([0.5, 0.5]), None)
  # client 0: 0.1 * q0, client 1: 0.2 * q1; mean = 0.5 * (0.1 q0 + 0.2 q1)
  expected = jnp.array([[0.15, 0.3, 0.15], [-0.05, 0.05, 0.25]])
  np.testing.assert_allclose(new["params"]["Dense_0"]["kernel"],
                             variables["params"]["Dense_0"]["kernel"] + expected, atol=1e-6)
  np.testing.assert_allclose(new["params"]["Dense_0"]["bias"], [0.5, 0.5, 0.5])


# ----------------------------------------------------------------------------- FedDQ


@pytest.mark.parametrize("value_range, resolution, bits", [
    (0.1, 0.001, 7),      # log2(100) = 6.64
    (1.0, 0.001, 10),     # log2(1000) = 9.97
    (0.003, 0.001, 2),    # log2(3) = 1.58 -> max(2, 2)
    (0.0005, 0.001, 2),   # log2(0.5) = -1 -> 2
    (0.0, 0.001, 2),      # no update at all
    (100.0, 0.001, 16),   # log2(1e5) = 16.6 -> capped
])
def test_feddq_bit_width_from_range(value_range, resolution, bits):
  assert int(feddq.bit_width(value_range, resolution, 16)) == bits


def test_feddq_client_width_follows_its_own_range():
  algo = get_algorithm(small_config(algorithm="feddq", feddq__resolution=0.01))
  variables = _tiny_variables()
  server = algo.init(jax.random.key(0), variables)
  down = algo.broadcast(server, jax.random.key(1), None)
  widths = []
  for scale in (1.0, 0.1, 0.01):   # range of the update: 2.0, 0.2, 0.02
    local = algo.client_start(down, {}, None)
    moved = jax.tree.map(lambda x: x, local.trainable)
    moved["Dense_0"]["kernel"] = moved["Dense_0"]["kernel"] + scale * jnp.array(
        [[1., -1., 0.], [0.5, 0., 0.]])
    up, _ = algo.client_finish(down, {}, LocalState(moved, {}), jax.random.key(2), {})
    widths.append(int(up["weights"]["Dense_0"]["kernel"].width))
    deq = quant.dequantize_minmax(up["weights"]["Dense_0"]["kernel"].values,
                                  up["step"]["Dense_0"]["kernel"], up["min"]["Dense_0"]["kernel"])
    np.testing.assert_allclose(deq, moved["Dense_0"]["kernel"] - down["weights"]["Dense_0"]["kernel"],
                               atol=0.01 / 2 + 1e-6)   # error <= resolution / 2
  assert widths == [8, 5, 2]   # ceil(log2(200)), ceil(log2(20)), ceil(log2(2)) -> 2


def test_feddq_uplink_bpp_by_hand():
  """Two clients, two 6-weight kernels, resolution 0.01; the ledger (`rounds.traffic`) must
  count each client's own width per kernel: bits = max(ceil(log2(range / 0.01)), 2).

    client A: Dense_0 range 2.0  -> ceil(7.64) = 8;  Dense_1 range 0.02 -> ceil(1.0) -> 2
    client B: Dense_0 range 0.2  -> ceil(4.32) = 5;  Dense_1 range 0.5  -> ceil(5.64) = 6
    uplink bpp = (6 * 8 + 6 * 2 + 6 * 5 + 6 * 6) / (2 clients x 12 weights) = 126 / 24 = 5.25
  """
  algo = get_algorithm(small_config(algorithm="feddq", num_clients=2, feddq__resolution=0.01))
  variables = {"params": {
      "Dense_0": {"kernel": jnp.array([[0.5, -0.5, 1.0], [0.0, 2.0, -1.0]]), "bias": jnp.zeros(3)},
      "Dense_1": {"kernel": jnp.array([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])}}}
  server = algo.init(jax.random.key(0), variables)
  down = algo.broadcast(server, jax.random.key(1), None)
  move0 = jnp.array([[1., -1., 0.], [0.5, 0., 0.]])      # range 2
  move1 = jnp.array([[1., -1.], [0., 0.], [0., 0.]])     # range 2
  ups = []
  for scale0, scale1 in ((1.0, 0.01), (0.1, 0.25)):
    local = algo.client_start(down, {}, None)
    moved = jax.tree.map(lambda x: x, local.trainable)
    moved["Dense_0"]["kernel"] = moved["Dense_0"]["kernel"] + scale0 * move0
    moved["Dense_1"]["kernel"] = moved["Dense_1"]["kernel"] + scale1 * move1
    ups.append(algo.client_finish(down, {}, LocalState(moved, {}), jax.random.key(2), {})[0])
  stacked = _stack(*ups)
  assert [int(w) for w in stacked["weights"]["Dense_0"]["kernel"].width] == [8, 5]
  assert [int(w) for w in stacked["weights"]["Dense_1"]["kernel"].width] == [2, 6]
  sent = rounds.traffic(down, stacked, num_weights=12)
  assert sent["uplink_bpp"] == 5.25 and sent["downlink_bpp"] == 32.0


# ----------------------------------------------------------------------------- DAdaQuant


def test_dadaquant_level_width_is_ceil_log2_2q_plus_1():
  q = np.arange(1, 40000)
  expected = np.ceil(np.log2(2 * q + 1)).astype(int)
  np.testing.assert_array_equal(quant.level_width(jnp.asarray(q)), expected)
  assert quant.level_width(jnp.arange(1, 10)).tolist() == [2, 3, 3, 4, 4, 4, 4, 5, 5]


def test_dadaquant_doubles_on_a_hand_made_loss_sequence():
  """phi = 2, psi = 0 (the EMA is the loss itself), q_min = 1."""
  losses = [5.0, 4.0, 3.0, 3.5, 3.2, 3.6, 3.0, 3.7, 3.8, 3.9]
  # t=4: 3.2 >= F_2 = 3.0 and 4 rounds since start -> 2; t=5: 3.6 >= 3.5 but only 1 round since;
  # t=6: 3.0 < 3.6; t=7: 3.7 >= 3.6 -> 4; t=8: too soon; t=9: 3.9 >= 3.7 -> 8.
  expected = [1, 1, 1, 1, 2, 2, 2, 4, 4, 8]
  levels, got = dadaquant.init_levels(1, 2), []
  for loss in losses:
    levels = dadaquant.update_levels(levels, loss, phi=2, psi=0.0, q_max=100)
    got.append(int(levels["q"]))
  assert got == expected
  levels = dadaquant.init_levels(1, 1)   # the cap
  for loss in [1.0] * 12:
    levels = dadaquant.update_levels(levels, loss, phi=1, psi=0.0, q_max=5)
  assert int(levels["q"]) == 5


def test_dadaquant_phi_zero_is_a_tenth_of_the_rounds():
  # DAdaQuant's paper: phi = rounds / 10. 0 asks for it, floored and at least 1; any other phi
  # is kept. Through get_algorithm, the factory reads the run's `rounds`: the server's loss
  # history is phi long (F_{t-phi} .. F_{t-1}).
  assert [dadaquant.resolve_phi(0, r) for r in (200, 100, 30, 25, 9, 1)] == [20, 10, 3, 2, 1, 1]
  assert dadaquant.resolve_phi(7, 200) == 7
  config = base_config()
  config.algorithm, config.dadaquant.phi, config.rounds = "dadaquant", 0, 200
  variables = {"params": {"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}}}
  state = get_algorithm(config).init(jax.random.key(0), variables)
  assert state["levels"]["history"].shape == (20,)


def test_dadaquant_ema():
  levels = dadaquant.init_levels(1, 3)
  for loss in (2.0, 1.0, 4.0):
    levels = dadaquant.update_levels(levels, loss, phi=3, psi=0.5, q_max=100)
  # F0 = 2, F1 = 0.5*2 + 0.5*1 = 1.5, F2 = 0.5*1.5 + 0.5*4 = 2.75
  np.testing.assert_allclose(levels["history"], [2.0, 1.5, 2.75])


def test_dadaquant_client_levels_for_unequal_shares():
  """Shares 0.1, 0.2, 0.7 and q_t = 4: a = 1.34581, b = 0.54 / 16, sqrt(a / b) = 6.3147;
  q_i = round(6.3147 * [0.21544, 0.34200, 0.78837]) = round([1.360, 2.160, 4.978]) = [1, 2, 5]."""
  n = jnp.array([100.0, 200.0, 700.0])
  kappa = dadaquant.client_adaptive_scale(n, 4)
  assert dadaquant.client_levels(kappa, n, 32767).tolist() == [1, 2, 5]
  shares = n / n.sum()   # the same from shares: the formula is scale-invariant
  assert dadaquant.client_levels(dadaquant.client_adaptive_scale(shares, 4), shares,
                                 32767).tolist() == [1, 2, 5]
  equal = jnp.full((5,), 300.0)
  assert dadaquant.client_levels(dadaquant.client_adaptive_scale(equal, 8), equal,
                                 32767).tolist() == [8] * 5
  assert quant.level_width(jnp.array([1, 2, 5])).tolist() == [2, 3, 4]


def test_dadaquant_client_derives_its_level_from_the_broadcast():
  config = small_config(algorithm="dadaquant", local_epochs=2)
  algo = get_algorithm(config)
  variables = _tiny_variables()
  server = algo.init(jax.random.key(0), variables)
  server["levels"]["q"] = jnp.asarray(4, jnp.int32)
  n = jnp.array([100.0, 200.0, 700.0])
  down = algo.broadcast(server, jax.random.key(1), RoundInfo(n / n.sum(), n))
  got = []
  for c in range(3):
    local = algo.client_start(down, {}, None)
    up, _ = algo.client_finish(down, {}, local, jax.random.key(c),
                               {"loss_sum": jnp.float32(1.0), "count": 2 * n[c]})
    got.append((int(up["levels"]), int(up["weights"]["Dense_0"]["kernel"].width)))
  assert got == [(1, 2), (2, 3), (5, 4)]


# ----------------------------------------------------------------------------- engine runs


@pytest.mark.slow
# Measured on the 2-core CPU after rounds 0 and 1 (test accuracy; test loss): SignSGD 0.075,
# 0.192; 3.27, 2.72 (its server step is 0.001 per vote); FedPAQ 0.506, 0.808; 1.79, 1.05; FedDQ
# 0.506, 0.817; DAdaQuant 0.439, 0.822; 1.80, 1.00. Chance is 0.1 on the 10 digit classes.
@pytest.mark.parametrize("algorithm, up_bpp, down_bpp, min_accuracy, loss_ratio", [
    ("signsgd", 1.0, 1.0, 0.14, 0.9), ("fedpaq", 4.0, 32.0, 0.65, 0.75),
    ("feddq", None, 32.0, 0.65, 0.75), ("dadaquant", 2.0, 32.0, 0.65, 0.75)])
def test_baseline_runs_two_rounds_with_checked_wire(tmp_path, monkeypatch, algorithm, up_bpp,
                                                    down_bpp, min_accuracy, loss_ratio):
  sent = []   # each round's stacked uplinks, as the ledger counted them
  traffic = rounds.traffic

  def spy(downlink, uplinks, num_weights, *codec):
    sent.append(jax.device_get(uplinks))
    return traffic(downlink, uplinks, num_weights, *codec)

  monkeypatch.setattr(rounds, "traffic", spy)
  summary = train_and_evaluate(small_config(algorithm=algorithm, rounds=2, wire_check_every=1),
                               str(tmp_path)).summary
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert len(rows) == 2 and summary["final_accuracy"] > min_accuracy
  assert rows[1]["test_loss"] < loss_ratio * rows[0]["test_loss"]
  assert rows[1]["train_loss"] < rows[0]["train_loss"]
  for r in rows:
    assert r["downlink_bpp"] == down_bpp
    if up_bpp is not None:
      assert r["uplink_bpp"] == up_bpp                     # DAdaQuant: q = 1 -> 2 bits
    assert r["uplink_total_bpp"] > r["uplink_bpp"] and r["downlink_total_bpp"] > r["downlink_bpp"]
    assert r["uplink_bits"] == 8 * (r["cumulative_uplink_bytes"] - (
        rows[0]["cumulative_uplink_bytes"] if r["round"] else 0))
  if algorithm == "feddq":
    _check_feddq_widths(rows, sent, resolution=0.001)


def _check_feddq_widths(rows, sent, resolution):
  """Each client's width per kernel follows FedDQ's rule from the range its codes span
  (min-max quantization puts min(Delta) at code 0 and max(Delta) at 2^bits - 1, so the range is
  step x (2^bits - 1)), and the round's uplink bpp is sum_c sum_k bits_ck n_k / (C sum_k n_k)."""
  for r, uplinks in zip(rows, sent):
    kernels = jax.tree.leaves(uplinks["weights"], is_leaf=lambda x: isinstance(x, Bits))
    steps = jax.tree.leaves(uplinks["step"])
    num_clients = len(kernels[0].width)
    bits = total = 0
    for kernel, step in zip(kernels, steps):
      n = math.prod(kernel.values.shape[1:])
      total += n
      for c in range(num_clients):
        width, codes = int(kernel.width[c]), kernel.values[c]
        assert codes.min() == 0 and codes.max() == 2 ** width - 1
        raw = math.log2(float(step[c]) * (2 ** width - 1) / resolution)
        assert width in {min(max(math.ceil(raw + e), 2), 16) for e in (-1e-4, 1e-4)}, (width, raw)
        bits += width * n
    assert r["uplink_bpp"] == pytest.approx(bits / (num_clients * total), rel=1e-12)
    assert 2.0 < r["uplink_bpp"] < 16.0
  # Descending quantization: the updates shrink from round 0 to round 1, and so do the widths
  # (measured: 7.12, then 5.99 bpp).
  assert rows[1]["uplink_bpp"] < rows[0]["uplink_bpp"]


@pytest.mark.parametrize("overrides, field", [
    (dict(algorithm="fedpaq", fedpaq__bits=1), "fedpaq.bits"),
    (dict(algorithm="fedpaq", fedpaq__bits=9), "fedpaq.bits"),
    (dict(algorithm="fedpaq", fedpaq__norm="l1"), "fedpaq.norm"),
    (dict(algorithm="feddq", feddq__resolution=0.0), "feddq.resolution"),
    (dict(algorithm="feddq", feddq__resolution=-0.001), "feddq.resolution"),
    (dict(algorithm="feddq", feddq__max_bits=17), "feddq.max_bits"),
    (dict(algorithm="feddq", feddq__granularity="layer"), "feddq.granularity"),
    (dict(algorithm="dadaquant", dadaquant__phi=-1), "dadaquant.phi"),
    (dict(algorithm="dadaquant", dadaquant__psi=1.0), "dadaquant.psi"),
    (dict(algorithm="dadaquant", dadaquant__q_min=0), "dadaquant.q_min"),
    (dict(algorithm="dadaquant", dadaquant__q_max=40000), "dadaquant.q_max"),
    (dict(algorithm="signsgd", signsgd__server_lr=0.0), "signsgd.server_lr"),
    (dict(algorithm="signsgd", signsgd__tie_break="zero"), "signsgd.tie_break"),
    (dict(wire_check_every=-1), "wire_check_every"),
    (dict(wire_codec="zstd"), "wire_codec"),
])
def test_bad_baseline_config_is_one_line(tmp_path, overrides, field):
  with pytest.raises(ConfigError) as info:
    train_and_evaluate(small_config(**overrides), str(tmp_path))
  message = str(info.value)
  assert message.startswith(field + ":") and "\n" not in message, message


@pytest.mark.slow
def test_signsgd_resumes_to_the_same_rounds(tmp_path):
  """SignSGD's state lives on both sides (the clients' model copies, the server's vote and key):
  dropping the last checkpoint and rerunning replays that round exactly."""
  import shutil
  config = small_config(algorithm="signsgd", checkpoint_every=1, wire_check_every=0)
  train_and_evaluate(config, str(tmp_path))
  straight = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  shutil.rmtree(tmp_path / "checkpoints" / "2")
  train_and_evaluate(config, str(tmp_path))   # resumes after round 1, reruns round 2
  resumed = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_seconds"} for r in rows]
  assert len(straight) == 2 and strip(resumed) == strip(straight)
