"""Tests for fedbif_jax.selectors: which bits are activated in a round (Sec. 3.2).

Covers the paper's sequential selector (disjoint groups of s bits that together cover all m
bits, msb_first / lsb_first order, traced round index under jit), the random selector
(deterministic per key, exactly s bits, varies across keys), the fixed selector and its
paper default (the third bit from the MSB, index m - 3), `make_selector`, `active_indices`, and
the ValueErrors for bad s, m, order, bit lists and selector names.
"""

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedbif_jax import selectors

_FAST = settings(max_examples=30, deadline=None)


def _active_set(mask):
  mask = np.asarray(mask)
  assert mask.dtype == np.bool_
  return set(np.flatnonzero(mask).tolist())


# ----------------------------------------------------------------------------- sequential


def test_sequential_m4_s2_msb_first_alternates_1100_and_0011():
  masks = [selectors.sequential(t, 4, 2) for t in range(6)]
  for t, mask in enumerate(masks):
    assert mask.shape == (4,) and mask.dtype == jnp.bool_
    assert _active_set(mask) == ({2, 3} if t % 2 == 0 else {0, 1})
  # Explicit masks indexed by bit i (weight 2^i).
  np.testing.assert_array_equal(np.asarray(masks[0]), [False, False, True, True])
  np.testing.assert_array_equal(np.asarray(masks[1]), [True, True, False, False])
  assert _active_set(selectors.sequential(0, 4, 2, "msb_first")) == {2, 3}


def test_sequential_m4_s2_lsb_first_is_the_reverse():
  assert _active_set(selectors.sequential(0, 4, 2, "lsb_first")) == {0, 1}
  assert _active_set(selectors.sequential(1, 4, 2, "lsb_first")) == {2, 3}
  assert _active_set(selectors.sequential(2, 4, 2, "lsb_first")) == {0, 1}


@pytest.mark.parametrize("order, expected", [("msb_first", [3, 2, 1, 0]),
                                             ("lsb_first", [0, 1, 2, 3])])
def test_sequential_m4_s1_visits_every_bit_once_in_4_rounds(order, expected):
  seen = []
  for t in range(4):
    active = _active_set(selectors.sequential(t, 4, 1, order))
    assert len(active) == 1
    seen.extend(active)
  assert seen == expected
  # The cycle repeats.
  assert _active_set(selectors.sequential(4, 4, 1, order)) == {expected[0]}
  assert _active_set(selectors.sequential(7, 4, 1, order)) == {expected[3]}


@pytest.mark.parametrize("m, s", [(8, 2), (8, 4), (6, 3), (8, 8), (1, 1), (5, 1)])
@pytest.mark.parametrize("order", ["msb_first", "lsb_first"])
def test_sequential_groups_are_disjoint_contiguous_and_cover_all_bits(m, s, order):
  period = m // s
  groups = [_active_set(selectors.sequential(t, m, s, order)) for t in range(period)]
  covered = set()
  for g in groups:
    assert len(g) == s
    assert max(g) - min(g) == s - 1          # consecutive bits
    assert not covered & g                   # no overlap within a period
    covered |= g
  assert covered == set(range(m))
  if order == "msb_first":
    assert max(groups[0]) == m - 1
  else:
    assert min(groups[0]) == 0
  # Periodic with period m / s.
  for t in range(period, 2 * period + 1):
    assert _active_set(selectors.sequential(t, m, s, order)) == groups[t % period]


def test_sequential_accepts_a_traced_round_index_under_jit():
  f = jax.jit(lambda t: selectors.sequential(t, 4, 2))
  g = jax.jit(lambda t: selectors.sequential(t, 4, 1, "lsb_first"))
  for t in range(5):
    np.testing.assert_array_equal(np.asarray(f(jnp.int32(t))),
                                  np.asarray(selectors.sequential(t, 4, 2)))
    assert _active_set(g(jnp.asarray(t, jnp.int32))) == {t % 4}
  assert _active_set(f(jnp.int32(0))) == {2, 3}
  assert _active_set(f(jnp.int32(1))) == {0, 1}


def test_sequential_under_lax_scan_over_rounds():
  def body(carry, t):
    return carry, selectors.sequential(t, 4, 1)
  _, masks = jax.lax.scan(body, 0, jnp.arange(8, dtype=jnp.int32))
  assert masks.shape == (8, 4)
  assert [int(np.flatnonzero(mk)[0]) for mk in np.asarray(masks)] == [3, 2, 1, 0, 3, 2, 1, 0]


# ----------------------------------------------------------------------------- random


def test_random_is_deterministic_given_key_and_has_exactly_s_bits():
  key = jax.random.PRNGKey(42)
  a = selectors.random(key, 8, 3)
  b = selectors.random(key, 8, 3)
  assert a.shape == (8,) and a.dtype == jnp.bool_
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert len(_active_set(a)) == 3


@_FAST
@given(seed=st.integers(0, 2 ** 31 - 1), s=st.integers(1, 8))
def test_random_has_exactly_s_distinct_bits_for_any_key(seed, s):
  mask = selectors.random(jax.random.PRNGKey(seed), 8, s)
  assert mask.shape == (8,)
  assert int(np.asarray(mask).sum()) == s


def test_random_differs_across_keys_and_covers_every_bit():
  masks = [tuple(np.asarray(selectors.random(jax.random.PRNGKey(k), 8, 2)).tolist())
           for k in range(20)]
  assert len(set(masks)) > 5           # 28 possible masks; 20 keys give many distinct ones
  assert np.any(np.asarray(masks), axis=0).all()   # every bit is picked by some key


def test_random_under_jit_with_traced_key():
  f = jax.jit(lambda k: selectors.random(k, 4, 2))
  key = jax.random.PRNGKey(9)
  np.testing.assert_array_equal(np.asarray(f(key)), np.asarray(selectors.random(key, 4, 2)))


# ----------------------------------------------------------------------------- fixed


def test_fixed_mask_has_exactly_the_given_bits():
  mask = selectors.fixed(8, [5, 0])
  assert mask.dtype == jnp.bool_ and mask.shape == (8,)
  assert _active_set(mask) == {0, 5}
  assert _active_set(selectors.fixed(4, (1,))) == {1}


@pytest.mark.parametrize("m", [3, 4, 8])
def test_fixed_third_bit_is_index_m_minus_3(m):
  assert selectors.fixed_third_bit(m) == m - 3


def test_fixed_third_bit_needs_m_at_least_3():
  with pytest.raises(ValueError, match=r"^m: .*m >= 3"):
    selectors.fixed_third_bit(2)


@pytest.mark.parametrize("m", [3, 4, 8])
def test_make_selector_fixed_default_is_the_third_bit_from_msb(m):
  select = selectors.make_selector("fixed", m, 1)
  for t in range(3):
    mask = select(jnp.int32(t), jax.random.PRNGKey(t))
    assert _active_set(mask) == {m - 3}


def test_make_selector_fixed_default_with_s2_goes_downwards_from_the_third_bit():
  select = selectors.make_selector("fixed", 8, 2)
  assert _active_set(select(0, jax.random.PRNGKey(0))) == {5, 4}
  select = selectors.make_selector("fixed", 4, 2)
  assert _active_set(select(3, jax.random.PRNGKey(0))) == {1, 0}


def test_make_selector_fixed_with_explicit_bits():
  select = selectors.make_selector("fixed", 8, 2, fixed_bits=[7, 1])
  assert _active_set(select(0, None)) == {1, 7}
  with pytest.raises(ValueError, match=r"^fixed_bits: .*s=2"):
    selectors.make_selector("fixed", 8, 2, fixed_bits=[7])


@pytest.mark.parametrize("bad", [[], [4], [-1], [1, 1], [0, 8]])
def test_fixed_rejects_bad_bit_lists(bad):
  with pytest.raises(ValueError, match=r"^fixed_bits: .*0\.\.3"):
    selectors.fixed(4, bad)


# ----------------------------------------------------------------------------- make_selector


def test_make_selector_sequential_and_random_match_the_functions():
  seq = selectors.make_selector("sequential", 4, 2)
  lsb = selectors.make_selector("sequential", 4, 2, order="lsb_first")
  rnd = selectors.make_selector("random", 8, 3)
  for t in range(4):
    key = jax.random.PRNGKey(100 + t)
    np.testing.assert_array_equal(np.asarray(seq(jnp.int32(t), key)),
                                  np.asarray(selectors.sequential(t, 4, 2)))
    np.testing.assert_array_equal(np.asarray(lsb(t, key)),
                                  np.asarray(selectors.sequential(t, 4, 2, "lsb_first")))
    np.testing.assert_array_equal(np.asarray(rnd(t, key)),
                                  np.asarray(selectors.random(key, 8, 3)))


def test_make_selector_select_works_under_jit():
  select = selectors.make_selector("sequential", 8, 4)
  f = jax.jit(select)
  assert _active_set(f(jnp.int32(0), jax.random.PRNGKey(0))) == {4, 5, 6, 7}
  assert _active_set(f(jnp.int32(1), jax.random.PRNGKey(0))) == {0, 1, 2, 3}


# ----------------------------------------------------------------------------- active_indices


def test_active_indices_are_ascending_int32():
  idx = selectors.active_indices(jnp.asarray([False, True, False, True, True]), 3)
  assert idx.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(idx), [1, 3, 4])
  np.testing.assert_array_equal(np.asarray(selectors.active_indices(selectors.sequential(0, 4, 2), 2)),
                                [2, 3])


def test_active_indices_under_jit_has_static_size():
  f = jax.jit(lambda mask: selectors.active_indices(mask, 2))
  np.testing.assert_array_equal(np.asarray(f(jnp.asarray([True, False, False, True]))), [0, 3])
  np.testing.assert_array_equal(np.asarray(f(jnp.asarray([False, True, True, False]))), [1, 2])


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("s", [0, -1, 5, 2.0, True, "2"])
def test_bad_active_bit_count_raises_naming_s_and_range(s):
  for fn in (lambda: selectors.sequential(0, 4, s), lambda: selectors.random(jax.random.PRNGKey(0), 4, s),
             lambda: selectors.make_selector("sequential", 4, s),
             lambda: selectors.make_selector("random", 4, s),
             lambda: selectors.make_selector("fixed", 4, s),
             lambda: selectors.check_active_bits(4, s)):
    with pytest.raises(ValueError, match=r"^s: .*1\.\.4") as info:
      fn()
    assert "\n" not in str(info.value)


def test_check_active_bits_uses_the_given_field_name():
  with pytest.raises(ValueError, match=r"^fedbif\.active_bits: .*1\.\.8.*got 9"):
    selectors.check_active_bits(8, 9, "fedbif.active_bits")
  assert selectors.check_active_bits(8, 8) == 8


@pytest.mark.parametrize("m, s", [(4, 3), (8, 3), (8, 5), (6, 4)])
def test_sequential_rejects_s_not_dividing_m(m, s):
  with pytest.raises(ValueError, match=rf"^s: must divide the bit width m={m}"):
    selectors.sequential(0, m, s)
  with pytest.raises(ValueError, match=rf"^s: must divide the bit width m={m}"):
    selectors.make_selector("sequential", m, s)


def test_random_and_fixed_allow_s_not_dividing_m():
  assert len(_active_set(selectors.random(jax.random.PRNGKey(0), 4, 3))) == 3
  assert _active_set(selectors.make_selector("fixed", 8, 3)(0, None)) == {5, 4, 3}


@pytest.mark.parametrize("m", [0, 9, 2.5])
def test_selectors_reject_bad_m(m):
  for fn in (lambda: selectors.sequential(0, m, 1), lambda: selectors.random(jax.random.PRNGKey(0), m, 1),
             lambda: selectors.fixed(m, [0]), lambda: selectors.make_selector("sequential", m, 1)):
    with pytest.raises(ValueError, match=r"^m: .*1\.\.8"):
      fn()


def test_bad_order_and_selector_name_raise():
  with pytest.raises(ValueError, match=r"^order: .*msb_first.*lsb_first"):
    selectors.sequential(0, 4, 2, "middle_out")
  with pytest.raises(ValueError, match=r"^order: "):
    selectors.make_selector("sequential", 4, 2, order="middle_out")
  with pytest.raises(ValueError, match=r"^selector: .*sequential.*fixed.*random"):
    selectors.make_selector("greedy", 4, 2)


# ----------------------------------------------------------------- regressions of fixed bugs


def test_make_selector_bad_fixed_bits_error_names_fixed_bits():
  with pytest.raises(ValueError, match=r"^fixed_bits: .*0\.\.7"):
    selectors.make_selector("fixed", 8, 1, fixed_bits=[9])


def test_make_selector_fixed_default_that_does_not_fit_names_s():
  with pytest.raises(ValueError, match=r"^(s|fixed_bits): "):
    selectors.make_selector("fixed", 3, 2)


def test_check_active_bits_accepts_numpy_integers_like_check_bits():
  assert selectors.check_active_bits(4, np.int64(2)) == 2
  assert _active_set(selectors.sequential(0, 4, np.int32(2))) == {2, 3}


# ----------------------------------------------------------------------------- flip_rate


@pytest.mark.slow
@_FAST
@given(st.sampled_from([(1, 1), (2, 1), (2, 2), (4, 1), (4, 2), (4, 4), (6, 2), (6, 3), (8, 1),
                        (8, 2), (8, 4)]),
       st.sampled_from(selectors.ORDERS), st.floats(0.0, 1.0))
def test_flip_rate_with_equal_rates_is_the_sequential_cycle(ms, order, rate):
  # Every plane flipping at the same rate: the score is the idle count alone, so the adaptive
  # selector must walk exactly the paper's sequential groups, in `order`, round after round.
  m, s = ms
  stats = selectors.flip_rate_init(m)
  for t in range(2 * m // s + 1):
    mask = selectors.flip_rate_select(stats, s, order)
    np.testing.assert_array_equal(np.asarray(mask), np.asarray(selectors.sequential(t, m, s, order)))
    stats = selectors.flip_rate_update(stats, mask, jnp.full((m,), rate))


def _tried(rate, idle):
  return {"rate": jnp.array(rate, jnp.float32), "idle": jnp.array(idle, jnp.int32),
          "tried": jnp.ones((len(rate),), bool)}


def test_flip_rate_scores_by_hand():
  # Rates 0.008, 0.001, 0.003, 0 have mean 0.003: relative 8/3, 1/3, 1, 0. Score (relative + 0.1)
  # times (1 + idle): bit 0: 2.7667 * 1 = 2.77; bit 1: 0.4333 * 5 = 2.17; bit 2: 1.1 * 3 = 3.3;
  # bit 3: 0.1 * 40 = 4.0. Top one: bit 3; top two: bits 3 and 2; top three add bit 0.
  stats = _tried([0.008, 0.001, 0.003, 0.0], [0, 4, 2, 39])
  np.testing.assert_allclose(np.asarray(selectors.flip_rate_scores(stats)),
                             [(8 / 3 + 0.1) * 1, (1 / 3 + 0.1) * 5, 1.1 * 3, 0.1 * 40], rtol=1e-6)
  assert _active_set(selectors.flip_rate_select(stats, 1)) == {3}
  assert _active_set(selectors.flip_rate_select(stats, 2)) == {2, 3}
  assert _active_set(selectors.flip_rate_select(stats, 3)) == {0, 2, 3}
  # Bit 3 at idle 20 scores 2.1: bit 2 (3.3) and bit 0 (2.77) and bit 1 (2.17) come first.
  stats["idle"] = jnp.array([0, 4, 2, 20])
  assert _active_set(selectors.flip_rate_select(stats, 1)) == {2}
  assert _active_set(selectors.flip_rate_select(stats, 3)) == {0, 1, 2}
  # An exact tie (relative 1 each, 1.1 * 2 for bits 1 and 2): msb_first takes 2, lsb_first 1.
  tie = _tried([0.0, 0.002, 0.002, 0.0], [0, 1, 1, 0])
  assert _active_set(selectors.flip_rate_select(tie, 1, "msb_first")) == {2}
  assert _active_set(selectors.flip_rate_select(tie, 1, "lsb_first")) == {1}


def test_flip_rate_puts_untried_planes_first_in_order():
  stats = _tried([0.9, 0.0, 0.0, 0.0], [0, 0, 0, 50])
  stats["tried"] = jnp.array([True, False, False, True])
  assert _active_set(selectors.flip_rate_select(stats, 1, "msb_first")) == {2}
  assert _active_set(selectors.flip_rate_select(stats, 1, "lsb_first")) == {1}
  assert _active_set(selectors.flip_rate_select(stats, 3, "msb_first")) == {1, 2, 3}


@_FAST
@given(st.lists(st.floats(1e-6, 1.0), min_size=4, max_size=4),
       st.lists(st.integers(0, 30), min_size=4, max_size=4),
       st.floats(1e-4, 1e4), st.integers(1, 3))
def test_flip_rate_selection_is_scale_free(rates, idle, scale, s):
  # Only the rates' ratios matter: flip rates of 1e-3 select exactly as rates of 0.5 would.
  stats = _tried(rates, idle)
  scaled = _tried([r * scale for r in rates], idle)
  np.testing.assert_allclose(np.asarray(selectors.flip_rate_scores(scaled)),
                             np.asarray(selectors.flip_rate_scores(stats)), rtol=1e-4)
  np.testing.assert_array_equal(np.asarray(selectors.flip_rate_select(scaled, s)),
                                np.asarray(selectors.flip_rate_select(stats, s)))


@jax.jit
def _flip_rate_masks(rates):
  """The s=1 flip_rate selector's masks over rounds whose planes flip at `rates` [T, m]."""
  def round_(stats, rates_t):
    mask = selectors.flip_rate_select(stats, 1)
    return selectors.flip_rate_update(stats, mask, rates_t), mask
  return jax.lax.scan(round_, selectors.flip_rate_init(rates.shape[1]), rates)[1]


@pytest.mark.slow
@_FAST
@given(st.sampled_from([2, 4, 8]), st.integers(0, 7),
       st.lists(st.floats(0.0, 1.0), min_size=64, max_size=64))
def test_flip_rate_never_starves_a_plane_that_never_flips(m, silent, noise):
  # Plane `silent` never flips while the others flip at arbitrary rates. Its relative rate is 0
  # and every other plane's is at most m, so once its idle count k has (1 + k) * 0.1 above
  # (m + 0.1) * m it outranks any plane that was active within the last m rounds, and one of
  # the next m rounds must take it: it is active at least once in every window of that length.
  silent %= m
  window = int(np.ceil(m * (m + selectors.FLIP_RATE_FLOOR) / selectors.FLIP_RATE_FLOOR)) + m
  rates = np.array([[0.0 if i == silent else noise[(t + i) % 64] + 1e-3 for i in range(m)]
                    for t in range(2 * window)], np.float32)
  active_rounds = np.flatnonzero(np.asarray(_flip_rate_masks(jnp.asarray(rates)))[:, silent])
  gaps = np.diff(np.concatenate([[0], active_rounds, [2 * window - 1]]))
  assert gaps.max() <= window, (active_rounds, window)


def test_flip_rate_adapts_to_the_quickstarts_measured_rates():
  # Rates measured per plane on the quickstart (bits 0..3 flip at 0.05%, 0.1%, 0.23%, 0.28%
  # of their bits a round): after the first cycle the planes that flip most come back most,
  # the least significant plane about every 11 rounds (the old absolute floor of 0.01 dwarfed
  # these rates and kept the sequential cycle).
  measured = jnp.array([0.0005, 0.001, 0.0023, 0.0028], jnp.float32)
  stats = selectors.flip_rate_init(4)
  chosen = []
  for _ in range(40):
    mask = selectors.flip_rate_select(stats, 1)
    chosen.append(int(np.flatnonzero(np.asarray(mask))[0]))
    stats = selectors.flip_rate_update(stats, mask, measured)
  assert chosen[:4] == [3, 2, 1, 0]          # untried planes first, most significant first
  assert np.bincount(chosen, minlength=4).tolist() == [4, 7, 14, 15]


def test_flip_rate_update_averages_active_planes_and_ages_the_others():
  stats = {"rate": jnp.array([0.2, 0.4, 0.6, 1.0]), "idle": jnp.array([3, 0, 1, 2]),
           "tried": jnp.array([True, True, False, True])}
  active = jnp.array([False, True, True, True])
  new = selectors.flip_rate_update(stats, active, jnp.array([9.0, 0.0, 0.3, 0.5]))
  # Tried and active: 0.5 * old + 0.5 * observed (bit 1: 0.2, bit 3: 0.75); bit 2's first
  # observation starts its average (0.3); idle reset. Bit 0, inactive, keeps its rate (the 9.0
  # observed there is ignored) and ages by one round.
  np.testing.assert_allclose(np.asarray(new["rate"]), [0.2, 0.2, 0.3, 0.75])
  np.testing.assert_array_equal(np.asarray(new["idle"]), [4, 0, 0, 0])
  np.testing.assert_array_equal(np.asarray(new["tried"]), [True, True, True, True])


def test_disagreements_by_hand():
  broadcast = jnp.array([[1, 0, 1, 1], [0, 0, 0, 1]])            # s=2 planes of 4 weights
  uploaded = jnp.array([[[1, 0, 1, 1], [1, 1, 0, 1]],             # client 0: 0 and 2 flips
                        [[0, 1, 0, 0], [0, 0, 0, 1]]])            # client 1: 4 and 0 flips
  counts = selectors.disagreements(uploaded, broadcast, jnp.array([0.25, 0.75]))
  np.testing.assert_allclose(np.asarray(counts), [0.25 * 0 + 0.75 * 4, 0.25 * 2 + 0.75 * 0])


def test_flip_rate_selector_through_fedbifs_broadcast_and_aggregate():
  # FedBiF-1/4 on one 4x3 kernel: round 0 activates the MSB (every plane untried, msb_first);
  # client 0 sends back the broadcast bits unchanged, client 1 flips every one of them, with
  # weights 0.25 / 0.75. The MSB plane's flip rate is 0.75 by hand, its first observation, and
  # the server state carries that, the idle counts and which planes were tried.
  from fedbif_jax import quant
  from fedbif_jax.algorithms import get_algorithm
  from fedbif_jax.config import base_config
  from fedbif_jax.pytrees import Bits
  config = base_config()
  config.fedbif.selector = "flip_rate"
  algorithm = get_algorithm(config)
  kernel = jax.random.normal(jax.random.key(0), (4, 3))
  variables = {"params": {"dense": {"kernel": kernel, "bias": jnp.zeros(3)}}}
  state = algorithm.init(jax.random.key(1), variables)
  downlink = algorithm.broadcast(state, jax.random.key(2), None)
  assert _active_set(downlink["active"]) == {3}
  sent = quant.to_bits(downlink["weights"]["dense"]["kernel"].values, 4)[3:4]   # [1, 4, 3]
  uploaded = jnp.stack([sent, 1 - sent])                                        # [2, 1, 4, 3]
  uplinks = {"weights": {"dense": {"kernel": Bits(uploaded, jnp.asarray(1, jnp.int32))}},
             "other": {"dense": {"bias": jnp.zeros((2, 3))}}, "model_state": {}}
  new_state = algorithm.aggregate(state, downlink, uplinks, jnp.array([0.25, 0.75]), None)
  np.testing.assert_allclose(np.asarray(new_state["selector"]["rate"]), [0, 0, 0, 0.75])
  np.testing.assert_array_equal(np.asarray(new_state["selector"]["idle"]), [1, 1, 1, 0])
  np.testing.assert_array_equal(np.asarray(new_state["selector"]["tried"]),
                                [False, False, False, True])
  # Round 1: bits 0..2 are untried and come first, in msb_first order: bit 2 is next.
  assert _active_set(algorithm.broadcast(new_state, jax.random.key(3), None)["active"]) == {2}
  # The other selectors keep the state they always had (no "selector" entry).
  assert "selector" not in get_algorithm(base_config()).init(jax.random.key(1), variables)


def test_make_selector_refuses_a_stateful_selector():
  with pytest.raises(ValueError, match="flip_rate_select"):
    selectors.make_selector("flip_rate", 4, 1)
