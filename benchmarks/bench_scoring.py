"""Scoring throughput: batched margin map vs a per-pair loop, draft-mode decoding, per-prompt calls, k-NN.

    python benchmarks/bench_scoring.py [--quick]

Prints ratios measured in this one run (medians of repeats where cheap). Not a test.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time

import faiss
import numpy as np
from PIL import Image
from transformers import CLIPImageProcessorPil

from fifa_hf.data import to_preference_pairs
from fifa_hf.scoring import CLIPRewardModel, HeuristicQualityScorer, MarginScorer, add_prompt_signals
from fifa_hf.scoring.diversity import knn_distances, knn_search
from fifa_hf.scoring.images import CLIPImageTransform, decode_image
from fifa_hf.testing import save_tiny_clip
from fifa_hf.world.synthetic import make_synthetic_pickapic


def timed(function, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_margin(directory: str, num_pairs: int) -> None:
    pairs, _ = to_preference_pairs(make_synthetic_pickapic(num_pairs, seed=0))
    reward = CLIPRewardModel(save_tiny_clip(f"{directory}/clip"), device="cpu")
    scorer = MarginScorer(reward)
    scorer(pairs[:2])  # load the model outside the timings
    batched = timed(lambda: pairs.map(scorer, batched=True, batch_size=64, load_from_cache_file=False, desc=None), 1)
    rows = pairs.to_list()
    loop = timed(lambda: [scorer({k: [row[k]] for k in ("prompt", "chosen", "rejected")}) for row in rows], 1)
    print(f"margin, tiny CLIP, {len(pairs)} pairs: batched map {len(pairs) / batched:,.0f} pairs/s, "
          f"per-pair loop {len(pairs) / loop:,.0f} pairs/s, ratio {loop / batched:.1f}x")  # fmt: skip


def photo_like_jpeg(rng: np.random.Generator, size: int = 512) -> bytes:
    """Smooth colour fields plus mild grain: compresses like a generated image, unlike pure noise."""
    low = Image.fromarray(rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    pixels = np.asarray(low, dtype=np.float32) + rng.normal(0, 6, size=(size, size, 3))
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def bench_decode(num_images: int) -> None:
    rng = np.random.default_rng(0)
    images = [photo_like_jpeg(rng) for _ in range(num_images)]
    processor = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    transform = CLIPImageTransform.from_image_processor(processor)
    plain = timed(lambda: processor(images=[Image.open(io.BytesIO(b)).convert("RGB") for b in images]))
    draft = timed(lambda: transform([decode_image(b, min_size=224) for b in images]))
    print(f"decode+preprocess, 512 px JPEG -> 224 (PickScore's processor), {num_images} images: "
          f"plain open+convert+processor {num_images / plain:,.0f} img/s, "
          f"draft decode+batched transform {num_images / draft:,.0f} img/s, ratio {plain / draft:.2f}x (target >= 2x)")  # fmt: skip


def bench_prompt_calls(num_pairs: int) -> None:
    pairs, _ = to_preference_pairs(make_synthetic_pickapic(num_pairs, seed=0, image_size=16))
    calls = []

    class CountingEmbedder:
        def __call__(self, prompts):
            calls.append(len(prompts))
            return np.random.default_rng(0).normal(size=(len(prompts), 8)).astype(np.float32)

    _, stats = add_prompt_signals(pairs, HeuristicQualityScorer(), CountingEmbedder())
    print(f"per-prompt calls on {len(pairs)} synthetic pairs ({stats.unique_prompts} unique prompts): "
          f"quality {stats.quality_scored}, embedding {sum(calls)}; "
          f"calls == unique prompts: {stats.quality_scored == sum(calls) == stats.unique_prompts}")  # fmt: skip


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    """Unit vectors around n / 40 centres: closer to prompt embeddings than isotropic noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(1, n // 40), dim)).astype(np.float32)
    x = centres[rng.integers(len(centres), size=n)] + 0.5 * rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def bench_knn(exact_n: int, approximate_n: int, k: int = 5) -> None:
    x = clustered(exact_n, 384, 0)
    start = time.perf_counter()
    knn_distances(x, k=k, method="exact")
    print(f"k-NN exact, {exact_n:,} x 384-d, k={k}: {time.perf_counter() - start:.1f} s (target <= 30 s)")

    x = clustered(approximate_n, 384, 1)
    start = time.perf_counter()
    distances, ids = knn_search(x, k=k, method="ivf")
    elapsed = time.perf_counter() - start
    sample = np.random.default_rng(2).choice(approximate_n, size=1000, replace=False)
    exact_index = faiss.IndexFlatL2(x.shape[1])
    exact_index.add(x)
    exact_d, exact_ids = exact_index.search(x[sample], k + 1)
    recall = np.mean([len(set(e[1:]) & set(a)) / k for e, a in zip(exact_ids, ids[sample])])
    exact_dk = np.sqrt(exact_d[:, k])
    relative = np.median(np.abs(distances[sample, -1] - exact_dk) / exact_dk)
    print(f"k-NN IVF (default nprobe), {approximate_n:,} x 384-d, k={k}: {elapsed:.1f} s; on 1,000 sampled queries "
          f"recall@{k} {recall:.3f}, median relative error of d_k {relative:.4f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="Small sizes, for a smoke run.")
    quick = parser.parse_args().quick
    with tempfile.TemporaryDirectory() as directory:
        bench_margin(directory, 200 if quick else 1000)
    bench_decode(16 if quick else 64)
    bench_prompt_calls(500 if quick else 5000)
    bench_knn(6000 if quick else 60_000, 50_000 if quick else 1_000_000)


if __name__ == "__main__":
    main()
