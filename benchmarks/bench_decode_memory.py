"""Peak memory of margin scoring on huge PNGs, by batch size: images are reduced as soon as decoded.

    python benchmarks/bench_decode_memory.py [--pairs 48] [--side 4000] [--batch_sizes 4 16 32]

Each run is ``fifa-hf filter`` (margins only, a tiny CLIP with PickScore's 224 px input) in its own
process over ``--pairs`` pairs of ``--side`` x ``--side`` PNGs, and reports its peak resident memory.
``reduced`` is the default decoding (``fifa_hf.images.decode_image`` with the model's input size);
``full`` decodes every image at full resolution (``MarginScorer(draft=False)``), as before. Target:
with reduction, the largest batch within 1.3x the peak of the smallest.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

RUN = """
import json, resource, sys
import fifa_hf.filter as filter_module
from fifa_hf.cli import main
if sys.argv[1] == "full":  # the old decoding: every image at full resolution for the whole batch
    original = filter_module.MarginScorer
    filter_module.MarginScorer = lambda *args, **kwargs: original(*args, draft=False, **kwargs)
main(sys.argv[2:])
print("BENCH " + json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def smooth_png(side: int, seed: int) -> bytes:
    """A smooth picture (gradients and a few shapes): a few hundred KB of PNG for 16M pixels."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    pixels = np.stack([np.add.outer(ramp, ramp) / 2, np.add.outer(ramp[::-1], ramp) / 2, np.tile(ramp, (side, 1))], -1)
    image = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y, r = rng.integers(0, side, 2).tolist() + [int(rng.integers(side // 20, side // 6))]
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=48)
    parser.add_argument("--side", type=int, default=4000)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[4, 16, 32])
    parser.add_argument("--modes", nargs="+", default=["reduced", "full"])
    args = parser.parse_args()
    import datasets

    from fifa_hf.testing import save_tiny_clip

    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        clip = save_tiny_clip(root / "clip", image_size=224)
        images = [smooth_png(args.side, seed) for seed in range(8)]
        print(
            f"{args.pairs} pairs of {args.side}x{args.side} PNG ({sum(map(len, images)) / len(images) / 1e3:.0f} KB each)"
        )
        rows = {
            "caption": [f"prompt {i % 7}" for i in range(args.pairs)],
            "jpg_0": [images[i % 8] for i in range(args.pairs)],
            "jpg_1": [images[(i + 3) % 8] for i in range(args.pairs)],
            "label_0": [float(i % 2) for i in range(args.pairs)],
        }
        datasets.Dataset.from_dict(rows).save_to_disk(root / "rows")
        peaks: dict[tuple[str, int], float] = {}
        for mode in args.modes:
            for batch_size in args.batch_sizes:
                out = root / f"out-{mode}-{batch_size}"
                command = [
                    sys.executable, "-c", RUN, mode, "filter", "--dataset_name", str(root / "rows"),
                    "--output_dir", str(out), "--reward_model", str(clip), "--method", "margin", "--alpha", "0",
                    "--k", "8", "--batch_size", str(batch_size), "--device", "cpu",
                ]  # fmt: skip
                process = subprocess.run(command, capture_output=True, text=True)
                if process.returncode:
                    sys.exit(process.stderr[-3000:])
                line = [line for line in process.stdout.splitlines() if line.startswith("BENCH ")][-1]
                peaks[mode, batch_size] = json.loads(line[len("BENCH ") :])["peak_rss_mb"]
                print(f"{mode:>8} decoding, batch {batch_size:>3}: peak RSS {peaks[mode, batch_size]:7.0f} MB")
        small, large = min(args.batch_sizes), max(args.batch_sizes)
        for mode in args.modes:
            ratio = peaks[mode, large] / peaks[mode, small]
            print(f"{mode:>8}: peak at batch {large} / batch {small} = {ratio:.2f}x (target <= 1.3x with reduction)")


if __name__ == "__main__":
    main()
