import numpy as np
import pytest

from fifa_hf.scoring import PromptEmbedder, diversity_by_prompt, knn_distances, knn_log_distances
from fifa_hf.scoring.diversity import offline_minilm_path


def brute_force_kth_distance(x, k):
    distances = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(distances, np.inf)
    return np.sort(distances, axis=1)[:, k - 1]


def test_knn_term_equals_brute_force():
    x = np.random.default_rng(0).normal(size=(300, 16)).astype(np.float32)
    for k in (1, 3, 7):
        np.testing.assert_allclose(knn_distances(x, k=k, method="exact"), brute_force_kth_distance(x, k), rtol=1e-4)
    expected = np.log(brute_force_kth_distance(x, 5) + 1e-6)
    np.testing.assert_allclose(knn_log_distances(x, k=5), expected, rtol=1e-4)
    np.testing.assert_allclose(knn_distances(x, k=3, query_batch_size=7), brute_force_kth_distance(x, 3), rtol=1e-4)


def test_duplicates_small_inputs_and_ivf():
    x = np.zeros((4, 8), dtype=np.float32)
    assert np.all(knn_distances(x, k=2) == 0) and np.all(np.isfinite(knn_log_distances(x, k=2)))
    assert knn_distances(np.ones((3, 2)), k=10).shape == (3,)
    assert np.isnan(knn_distances(np.ones((1, 2)))).all()
    x = np.random.default_rng(1).normal(size=(3000, 8)).astype(np.float32)
    exact, approximate = knn_distances(x, k=5, method="exact"), knn_distances(x, k=5, method="ivf", nprobe=64)
    assert np.mean(np.isclose(exact, approximate, rtol=1e-4)) > 0.95
    with pytest.raises(ValueError, match="method"):
        knn_distances(x, method="hnsw")


def test_minilm_diversity_favours_prompts_far_from_the_rest():
    prompts = [f"a red cube number {i}" for i in range(8)] + ["an oil painting of a stormy sea"]
    terms = diversity_by_prompt(prompts + prompts[:3], PromptEmbedder(offline_minilm_path(), device="cpu"), k=2)
    assert len(terms) == len(prompts)
    assert max(terms, key=terms.get) == "an oil painting of a stormy sea"


def test_each_unique_prompt_is_embedded_once_and_gets_its_knn_term():
    prompts = [f"prompt {i}" for i in range(12)]
    vectors = np.random.default_rng(2).normal(size=(12, 8)).astype(np.float32)
    batches = []

    def embedder(batch):  # precomputed embeddings stand in for a sentence-transformers model
        batches.append(list(batch))
        return vectors[[prompts.index(prompt) for prompt in batch]]

    terms = diversity_by_prompt(prompts + prompts[:4], embedder)  # defaults: k=5, epsilon=1e-6
    assert batches == [prompts] and list(terms) == prompts
    np.testing.assert_allclose(list(terms.values()), np.log(brute_force_kth_distance(vectors, 5) + 1e-6), rtol=1e-5)
    wider = diversity_by_prompt(prompts, embedder, k=2, epsilon=0.5)
    np.testing.assert_allclose(list(wider.values()), np.log(brute_force_kth_distance(vectors, 2) + 0.5), rtol=1e-5)
    with pytest.raises(ValueError, match="method"):
        diversity_by_prompt(prompts, embedder, method="hnsw")
    assert diversity_by_prompt([], embedder) == {}
