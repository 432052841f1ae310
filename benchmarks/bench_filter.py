"""End-to-end `fifa-hf filter` on 5,000 and 20,000 synthetic pairs with the tiny models.

    python benchmarks/bench_filter.py [--sizes 5000 20000]

Each size runs in its own process, which reports its wall seconds and peak resident memory; memory
must stay bounded (the 20k peak at most 1.3x the 5k peak) because scoring streams in chunks.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

RUN = """
import json, resource, sys, time
from fifa_hf.cli import main
start = time.perf_counter()
main(sys.argv[1:])
print("BENCH " + json.dumps({"seconds": time.perf_counter() - start,
                             "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000])
    sizes = parser.parse_args().sizes
    from fifa_hf.scoring.diversity import offline_minilm_path
    from fifa_hf.testing import save_tiny_clip, save_tiny_llm
    from fifa_hf.world.synthetic import make_synthetic_pickapic

    results = {}
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        clip, llm = save_tiny_clip(root / "clip"), save_tiny_llm(root / "llm")
        for size in sizes:
            make_synthetic_pickapic(size, seed=0).save_to_disk(root / f"source-{size}")
            args = [
                "filter", "--dataset_name", str(root / f"source-{size}"), "--output_dir", str(root / f"out-{size}"),
                "--reward_model", str(clip), "--quality_model", str(llm), "--embedding_model", offline_minilm_path(),
                "--k", "0.05", "--chunk_size", "2048", "--device", "cpu",
            ]  # fmt: skip
            process = subprocess.run([sys.executable, "-c", RUN, *args], capture_output=True, text=True)
            if process.returncode:
                sys.exit(process.stderr[-3000:])
            line = [line for line in process.stdout.splitlines() if line.startswith("BENCH ")][-1]
            results[size] = json.loads(line[len("BENCH ") :])
            print(f"{size:>6} pairs: {results[size]['seconds']:6.1f} s, {size / results[size]['seconds']:6.0f} pairs/s, "
                  f"peak RSS {results[size]['peak_rss_mb']:.0f} MB")  # fmt: skip
    if len(sizes) >= 2:
        small, large = results[sizes[0]], results[sizes[-1]]
        ratio = large["peak_rss_mb"] / small["peak_rss_mb"]
        print(f"peak memory {sizes[-1]} / {sizes[0]}: {ratio:.2f}x (target <= 1.3x); "
              f"time ratio {large['seconds'] / small['seconds']:.2f}x for {sizes[-1] / sizes[0]:.0f}x the pairs")  # fmt: skip


if __name__ == "__main__":
    main()
