import numpy as np
import pytest

from fifa_hf.selection import fifa_score, normalize, qsd_score, resolve_k, select, top_k


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
    np.testing.assert_allclose(scores, qsd_score(c["reward_chosen"], c["reward_rejected"]))
    assert qsd.tolist() == [0, 2]  # psi = (r - 3) / 7: 1 * (1 - 2/7) = 0.714 > 1 * (1 - 3/7) = 0.571
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
