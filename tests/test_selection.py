import numpy as np
import pytest

from fifa_hf.selection import (
    diminishing_returns_score,
    fifa_score,
    normalize,
    qsd_score,
    resolve_k,
    select,
    setwise_score,
    top_k,
)


def test_normalizations():
    x = np.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(normalize(x, "zscore"), [-1.224745, 0, 1.224745], atol=1e-6)
    np.testing.assert_allclose(normalize(x, "minmax"), [0, 0.5, 1])
    np.testing.assert_allclose(normalize(x, "none"), x)
    assert np.all(normalize(np.ones(3), "zscore") == 0) and np.all(normalize(np.ones(3), "minmax") == 0)
    with pytest.raises(ValueError, match="normalization"):
        normalize(x, "rank")


def test_fifa_score_weights_each_normalized_signal():
    margin, quality, diversity = np.array([0.0, 1.0]), np.array([1.0, 0.0]), np.array([0.0, 10.0])
    np.testing.assert_allclose(fifa_score(margin, quality, diversity, 1.0, 0.0, "minmax"), [1, 1])
    np.testing.assert_allclose(fifa_score(margin, quality, diversity, 2.0, 0.5, "minmax"), [2, 1.5])
    np.testing.assert_allclose(fifa_score(margin, None, None, 1, 1, "none"), margin)


def test_a_signal_missing_for_some_pairs_is_refused_and_one_missing_for_all_counts_for_nothing():
    margin = np.array([3.0, 2.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="1 non-finite values among 4 pairs"):
        fifa_score(margin, quality=np.array([0.0, np.nan, 0.1, 1.0]))  # zeros would have dropped quality for all
    columns = {"row_id": np.arange(4), "prompt": list("abcd"), "margin": np.array([np.nan, 3.0, 2.0, 1.0])}
    with pytest.raises(ValueError, match="drop the pairs it could not score"):
        select(columns, "fifa", k=1, alpha=0, gamma=0)  # the NaN pair would have been selected
    single_prompt_diversity = np.full(4, np.nan)  # the k-NN distance of a lone prompt is undefined
    np.testing.assert_allclose(fifa_score(margin, diversity=single_prompt_diversity), normalize(margin))


def test_fifa_score_defaults_weigh_the_three_z_scored_signals_equally():
    rng = np.random.default_rng(0)
    margin, quality, diversity = rng.normal(size=(3, 50)) * [[1.0], [5.0], [0.1]] + [[0.0], [3.0], [-2.0]]

    def z(x):
        return (x - x.mean()) / x.std()

    np.testing.assert_allclose(fifa_score(margin, quality, diversity), z(margin) + z(quality) + z(diversity))


def test_k_as_count_or_fraction():
    assert resolve_k(3, 10) == 3 and resolve_k(0.25, 10) == 3 and resolve_k(50, 10) == 10
    with pytest.raises(ValueError):
        resolve_k(2.5, 10)


def test_top_k_breaks_ties_by_row_id_and_caps_per_prompt():
    scores = np.array([1.0, 3.0, 3.0, 2.0, 3.0])
    row_ids = np.array([10, 14, 11, 12, 13])
    assert top_k(scores, 3, row_ids).tolist() == [2, 4, 1]
    prompts = ["a", "a", "a", "b", "a"]
    assert top_k(scores, 3, row_ids, prompts, max_per_prompt=2).tolist() == [2, 4, 3]


def columns():
    return {
        "row_id": np.arange(6),
        "prompt": list("aabbcc"),
        "margin": np.array([5.0, 1.0, 4.0, 0.0, 3.0, 2.0]),
        "reward_chosen": np.array([10.0, 9.0, 10.0, 3.0, 6.0, 5.0]),
        "reward_rejected": np.array([5.0, 8.0, 6.0, 3.0, 3.0, 3.0]),
        "quality": np.array([0.0, 0.0, 1.0, 1.0, 1.0, 1.0]),
        "diversity": np.zeros(6),
    }


def test_each_method_at_the_same_k():
    c = columns()
    assert select(c, "margin", k=2)[0].tolist() == [0, 2]
    assert select(c, "fifa", k=2, alpha=1, gamma=0)[0].tolist() == [2, 4]
    qsd, scores = select(c, "qsd", k=2)
    # psi = (r - 3) / 7 over all rewards; QSD = psi(chosen) * (1 - psi(rejected)), by hand:
    np.testing.assert_allclose(scores, [5 / 7, 6 / 7 * 2 / 7, 4 / 7, 0, 3 / 7, 2 / 7])
    assert qsd.tolist() == [0, 2]
    first, second = select(c, "random", k=3, seed=1)[0], select(c, "random", k=3, seed=1)[0]
    assert first.tolist() == second.tolist() and len(set(first.tolist())) == 3
    assert len(select(c, "fifa", k=0.5)[0]) == 3
    with pytest.raises(ValueError, match="quality"):
        select({k: v for k, v in c.items() if k != "quality"}, "fifa", k=2)
    with pytest.raises(ValueError, match="method"):
        select(c, "best", k=2)


def test_default_k_is_5000_pairs_or_the_top_5_33_percent_for_qsd():
    many = {name: np.resize(values, 60_000) for name, values in columns().items()}
    many["row_id"] = np.arange(60_000)
    assert len(select(many, "margin", k=None)[0]) == 5000
    assert len(select(many, "qsd", k=None)[0]) == 3198  # ceil(0.0533 * 60000)


def test_qsd_prefers_a_low_rejected_image_over_a_larger_margin():
    # Rewards span 0..10. Pair 0: chosen 10, rejected 9 (margin 1): 1.0 * (1 - 0.9) = 0.1.
    # Pair 1: chosen 5, rejected 4.5 (margin 0.5): 0.5 * (1 - 0.45) = 0.275, so QSD keeps pair 1;
    # ranking by psi(chosen) - psi(rejected) instead would keep pair 0.
    c = {
        "row_id": np.arange(3),
        "prompt": ["a", "b", "c"],
        "margin": np.array([1.0, 0.5, 0.0]),
        "reward_chosen": np.array([10.0, 5.0, 0.0]),
        "reward_rejected": np.array([9.0, 4.5, 0.0]),
    }
    positions, scores = select(c, "qsd", k=1)
    assert positions.tolist() == [1]
    np.testing.assert_allclose(scores, [0.1, 0.275, 0.0])


def pool():
    """Prompt "a" holds the five best margins; prompts "b" to "f" one slightly lower pair each; "junk" the best
    margin of all but quality 0.1; "unscored" has no quality."""
    prompts = ["a"] * 5 + ["b", "c", "d", "e", "f", "junk", "unscored"]
    return {
        "row_id": np.arange(len(prompts)),
        "prompt": prompts,
        "margin": np.array([3.0, 2.95, 2.9, 2.85, 2.8, 2.7, 2.65, 2.6, 2.55, 2.5, 9.0, 8.0]),
        "reward_chosen": np.zeros(len(prompts)),
        "reward_rejected": np.zeros(len(prompts)),
        "quality": np.array([0.9] * 10 + [0.1, np.nan]),
    }


def test_setwise_gate_removes_low_and_unscored_quality_and_never_fills_k_with_them():
    c = pool()
    positions, scores = select(c, "setwise", k=12, quality_threshold=0.5)
    assert sorted(positions.tolist()) == list(range(10))  # 10 pass the gate: fewer than K, never the rest
    assert np.isnan(scores[10]) and np.isnan(scores[11])
    strict, _ = select(c, "setwise", k=12, quality_threshold=0.95)
    assert len(strict) == 0
    assert len(select(c, "setwise", k=12, quality_threshold=0.9)[0]) == 10  # a quality at the gate passes
    everything, _ = select(c, "setwise", k=12, quality_threshold=0.0)
    assert 10 in everything.tolist() and 11 not in everything.tolist()  # quality 0.1 passes a gate at 0
    with pytest.raises(ValueError, match="quality"):
        select({k: v for k, v in c.items() if k != "quality"}, "setwise", k=2)


def test_diminishing_returns_cover_more_prompts_at_equal_k():
    c = pool()
    prompts = np.array(c["prompt"])

    def distinct(weight):
        return len(set(prompts[select(c, "setwise", k=5, diminishing_returns=weight)[0]]))

    # z-scored margins of the 10 gated pairs: "a"'s pairs are 0.33 sd apart, b..f continue the ladder
    assert [distinct(w) for w in (0.0, 1.0, 2.0, 5.0)] == [1, 3, 4, 5]
    assert set(prompts[select(c, "margin", k=5)[0]]) == {"junk", "unscored", "a"}  # margin alone: no gate


def test_diminishing_returns_score_is_the_greedy_marginal_value():
    scores = np.array([3.0, 1.0, 2.0, 5.0])
    prompts = ["a", "a", "a", "b"]
    values = diminishing_returns_score(scores, prompts, np.arange(4), weight=0.5)
    # prompt "a" in score order 3, 2, 1: the j-th best pays 0.5 * log(1 + j)
    np.testing.assert_allclose(values, [3.0, 1.0 - 0.5 * np.log(3), 2.0 - 0.5 * np.log(2), 5.0])
    # The top K by these values is what a greedy that re-scores every prompt after each pick keeps.
    rng = np.random.default_rng(0)
    scores, prompts = rng.normal(size=200), rng.integers(0, 30, size=200).astype(str)
    values = diminishing_returns_score(scores, prompts, np.arange(200), weight=0.7)
    taken, greedy = {}, []
    remaining = set(range(200))
    for _ in range(60):
        best = max(remaining, key=lambda i: (scores[i] - 0.7 * np.log1p(taken.get(prompts[i], 0)), -i))
        greedy.append(best)
        remaining.remove(best)
        taken[prompts[best]] = taken.get(prompts[best], 0) + 1
    assert top_k(values, 60, np.arange(200)).tolist() == greedy


def test_setwise_is_deterministic_and_ignores_row_order():
    c = pool()
    c["margin"] = np.array([2.0] * 10 + [9.0, 8.0])  # ties everywhere: the row_id decides
    first, _ = select(c, "setwise", k=6)
    assert first.tolist() == select(c, "setwise", k=6)[0].tolist()
    shuffled = np.random.default_rng(1).permutation(len(c["row_id"]))
    moved = {
        name: np.asarray(values, dtype=object if name == "prompt" else None)[shuffled] for name, values in c.items()
    }
    again, _ = select(moved, "setwise", k=6)
    assert moved["row_id"][again].tolist() == c["row_id"][first].tolist()
    assert c["row_id"][first].tolist() == [0, 5, 6, 7, 8, 9]  # one of "a" (its smallest row_id), then b..f


def test_setwise_on_the_qsd_base():
    c = pool()
    c["reward_chosen"], c["reward_rejected"] = c["margin"] + 1.0, np.ones(len(c["row_id"]))
    np.testing.assert_allclose(
        setwise_score(c, base="qsd", diminishing_returns=0.0)[:10],
        normalize(qsd_score(c["reward_chosen"], c["reward_rejected"])[:10]),
    )
    with pytest.raises(ValueError, match="setwise_base"):
        setwise_score(c, base="fifa")


def test_qsd_maps_rewards_of_any_range_onto_zero_to_one():
    chosen, rejected = np.array([20.4, 20.1, 20.25]), np.array([20.1, 20.4, 20.25])  # PickScore-like: span 0.3
    np.testing.assert_allclose(qsd_score(chosen, rejected), [1.0, 0.0, 0.25])
    same = qsd_score(np.full(3, 21.0), np.full(3, 21.0))  # one reward everywhere: defined, not NaN
    np.testing.assert_array_equal(same, np.zeros(3))


def test_setwise_defaults_to_the_margin_base_and_says_how_to_get_quality():
    c = pool()
    c["reward_chosen"], c["reward_rejected"] = np.ones(12), c["margin"]  # a qsd base would rank the other way
    np.testing.assert_array_equal(setwise_score(c), setwise_score(c, base="margin"))
    assert not np.allclose(setwise_score(c)[:10], setwise_score(c, base="qsd")[:10])
    without_quality = {name: values for name, values in c.items() if name != "quality"}
    with pytest.raises(
        ValueError, match=r"method='setwise' gates on prompt quality, but the scores have no 'quality'"
    ):
        setwise_score(without_quality)
    with pytest.raises(ValueError, match=r"--quality_scorer offline works offline\) or choose another method\.$"):
        setwise_score(without_quality)


def test_setwise_reads_plain_lists_with_missing_quality_as_below_the_gate():
    c = {name: list(values) for name, values in pool().items()}
    c["quality"] = [0.9] * 10 + [0.1, None]  # a null in a parquet column arrives as None
    positions, _ = select(c, "setwise", k=12)
    assert sorted(positions.tolist()) == list(range(10))


def test_select_defaults_fifa_to_equal_weights_on_z_scores_and_random_to_seed_0():
    rng = np.random.default_rng(3)
    c = {
        "row_id": np.arange(40), "prompt": [f"p{i % 9}" for i in range(40)], "margin": rng.normal(size=40),
        "quality": rng.random(40), "diversity": rng.normal(scale=5.0, size=40),
        "reward_chosen": rng.normal(size=40), "reward_rejected": rng.normal(size=40),
    }  # fmt: skip
    _, scores = select(c, "fifa", k=10)
    np.testing.assert_allclose(scores, normalize(c["margin"]) + normalize(c["quality"]) + normalize(c["diversity"]))
    positions, _ = select(c, "random", k=10)
    assert (
        positions.tolist()
        == select(c, "random", k=10, seed=0)[0].tolist()
        != select(c, "random", k=10, seed=1)[0].tolist()
    )


def test_bad_k_nan_scores_and_caps_without_prompts_are_refused_with_the_fix():
    assert resolve_k(1, 10) == 1 and resolve_k(0.05, 10) == 1
    for k in (0, -3, 1.5):
        with pytest.raises(ValueError, match=rf"k must be a positive count or a fraction in \(0, 1\), got {k}"):
            resolve_k(k, 10)
    c = pool()
    c["margin"][3] = np.nan  # an unscored pair reaching a method without a gate
    with pytest.raises(ValueError, match=r"^Scores contain NaN; drop unscored pairs before selecting\.$"):
        select(c, "margin", k=3)
    with pytest.raises(ValueError, match=r"^max_per_prompt needs the prompts\.$"):
        top_k(np.arange(4.0), 2, np.arange(4), max_per_prompt=1)


def test_normalizing_keeps_one_value_per_pair_even_when_empty_or_constant():
    assert normalize(np.ones(3), "minmax").tolist() == [0.0, 0.0, 0.0]
    assert normalize(np.array([]), "minmax").tolist() == [] and normalize(np.array([]), "zscore").tolist() == []


def test_select_passes_the_setwise_base_on():
    c = pool()
    c["reward_chosen"], c["reward_rejected"] = np.ones(12), c["margin"]
    _, on_qsd = select(c, "setwise", k=3, setwise_base="qsd")
    np.testing.assert_array_equal(on_qsd, setwise_score(c, base="qsd"))
