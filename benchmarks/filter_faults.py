"""Fault injection on `fifa-hf filter`: each failure scenario of issue 15, re-run and judged.

    python benchmarks/filter_faults.py [--only kill secrets ...]

Offline, with the tiny local models. Each scenario prints what it did and PASS or FAIL:

- ``changed``: the dataset is rebuilt with another seed at the same path: every row is rescored, no
  stale margin is reused, and every selected row's caption is the prompt it was scored on;
- ``options``: a bfloat16 re-run, or other weights at the same path, are refused, naming what changed;
- ``endpoint``: an endpoint answering 20% HTTP 500s, 10% hangs, 10% free text and 10% malformed JSON:
  no free text becomes a score, failures end as NaN with their reason and are never cached; replaced
  LLM weights at the same path are not served from the cache;
- ``kill``: ``kill -9`` at many points of a re-run with another ``k``: the directory is always entirely
  the old output or entirely the new one; a kill during the first write leaves no partial file;
- ``secrets``: an endpoint URL with user info and ``api-key``: no secret in any output file or log;
- ``images``: 16-bit PNGs give the margins of their 8-bit versions; EXIF-rotated JPEGs those of the
  upright images; a truncated JPEG in training data is dropped and counted by the trainer;
- ``k``: ``k`` above the pool warns, and fails with ``--strict``;
- ``offline``: with the Hub unreachable, the default filter fails at once naming model, flag and fix.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from fifa_hf.testing import LoopbackChatEndpoint, chat_completion

RESULTS: list[tuple[str, bool, str]] = []


def judge(name: str, ok: bool, detail: str) -> None:
    RESULTS.append((name, ok, detail))
    print(f"[{'PASS' if ok else 'FAIL'}] {name}: {detail}", flush=True)


def cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fifa_hf.cli", *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )  # fmt: skip


def filter_args(source: Path, out: Path, models: dict, *extra: str) -> list[str]:
    return [
        "filter", "--dataset_name", str(source), "--output_dir", str(out), "--reward_model", str(models["clip"]),
        "--method", "margin", "--quality_scorer", "heuristic", "--chunk_size", "64", "--device", "cpu", *extra,
    ]  # fmt: skip


# ---- scenarios -----------------------------------------------------------------------------------
def changed(root: Path, models: dict) -> None:
    from fifa_hf.world.synthetic import make_synthetic_pickapic

    source, out = root / "changed-rows", root / "changed-out"
    make_synthetic_pickapic(300, seed=0, image_size=32).save_to_disk(source)
    cli(*filter_args(source, out, models, "--k", "20")).check_returncode()
    make_synthetic_pickapic(300, seed=1, image_size=32).save_to_disk(root / "changed-new")
    os.rename(source, root / "changed-old")
    os.rename(root / "changed-new", source)
    rerun = cli(*filter_args(source, out, models, "--k", "20"))
    report = json.loads((out / "report.json").read_text())
    scores = pd.read_parquet(out / "scores.parquet")
    selected = scores[scores["selected"]].sort_values("rank")
    subset = pd.read_parquet(out / "data" / "train-00000-of-00001.parquet")
    mismatched = int((subset["caption"].to_numpy() != selected["prompt"].to_numpy()).sum())
    judge(
        "changed data at the same path",
        rerun.returncode == 0 and report["rescored_rows"] == 300 and report["resumed_rows"] == 0 and not mismatched,
        f"rescored {report['rescored_rows']} rows, reused {report['resumed_rows']}; selected captions differing "
        f"from their scored prompts: {mismatched} of {len(subset)}",
    )


def options(root: Path, models: dict) -> None:
    from fifa_hf.testing import save_tiny_clip
    from fifa_hf.world.synthetic import make_synthetic_pickapic

    source, out, clip = root / "options-rows", root / "options-out", root / "options-clip"
    make_synthetic_pickapic(64, seed=0, image_size=32).save_to_disk(source)
    save_tiny_clip(clip, seed=0)
    models = {**models, "clip": clip}
    cli(*filter_args(source, out, models, "--k", "10")).check_returncode()
    bf16 = cli(*filter_args(source, out, models, "--k", "10", "--dtype", "bfloat16"))
    save_tiny_clip(clip, seed=1)
    weights = cli(*filter_args(source, out, models, "--k", "10"))
    messages = [process.stderr.strip().splitlines()[-1] for process in (bf16, weights)]
    judge(
        "options that change scores",
        bf16.returncode != 0
        and "dtype: 'float32' -> 'bfloat16'" in messages[0]
        and "reward: 'clip:sha256:" in messages[1],
        " | ".join(message[:160] for message in messages),
    )


class FaultyEndpoint(LoopbackChatEndpoint):
    """An OpenAI-compatible endpoint on loopback: 20% HTTP 500, 10% hang, 10% free text, 10% malformed JSON."""

    FREE_TEXT = ["Sure! Here are 3 thoughts on this prompt.", "As an AI, I rate prompts on a 0 to 9 scale."]

    def __init__(self, seed: int = 0):
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.answers: dict[str, list[str]] = {}  # what each prompt was answered, in order
        super().__init__(self.reply)

    def reply(self, prompt: str, times_asked: int) -> tuple[int, dict | bytes]:
        with self.lock:
            draw = self.random.random()
            digit = str(self.random.randint(0, 9))
        if "always garbage" in prompt:
            draw = 0.35
        if draw < 0.2:
            status, payload, what = 500, b'{"error": "overloaded"}', "500"
        elif draw < 0.3:
            time.sleep(1.5)
            status, payload, what = 200, b"{}", "hang"
        elif draw < 0.4:
            answer = self.FREE_TEXT[int(draw * 100) % 2]
            status, payload, what = 200, chat_completion(answer), answer
        elif draw < 0.5:
            status, payload, what = 200, b'{"choices": [{"message": ', "malformed"
        else:
            status, payload, what = 200, chat_completion(digit), digit
        with self.lock:
            self.answers.setdefault(prompt, []).append(what)
        return status, payload


def endpoint(root: Path, models: dict) -> None:
    from fifa_hf.scoring import EndpointQualityScorer, ScoreCache, TransformersQualityScorer
    from fifa_hf.testing import save_tiny_llm
    from fifa_hf.world.synthetic import make_synthetic_pickapic

    server = FaultyEndpoint()
    prompts = list(dict.fromkeys(make_synthetic_pickapic(2000, seed=0, image_size=8)["caption"]))[:113]
    prompts.append("always garbage: a cat")
    cache = ScoreCache(root / "endpoint-cache.sqlite")
    scorer = EndpointQualityScorer(f"http://{server.host}/v1", "judge", timeout=0.5, max_retries=3, backoff=0.05)
    result = scorer(prompts, cache=cache)
    invented = [  # a score that is not the digit the endpoint answered for that prompt
        p for p, s in result.scores.items()
        if np.isfinite(s) and not any(a.isdigit() and int(a) / 9 == s for a in server.answers[p])
    ]  # fmt: skip
    reasons = Counter(error.split(":")[0] for error in result.errors.values())
    scored = sum(np.isfinite(s) for s in result.scores.values())
    judge(
        "endpoint faults",
        not invented and len(cache) == scored and result.errors.get(prompts[-1], "").startswith("unparseable_answer"),
        f"{len(prompts)} prompts: {scored} scored (each from a digit answer), NaN by reason {dict(reasons)}; "
        f"scores read from free text: {len(invented)}; cache rows {len(cache)} (= scored)",
    )
    llm = save_tiny_llm(root / "endpoint-llm", seed=0)
    first = TransformersQualityScorer(str(llm), device="cpu")(prompts[:20], cache=cache)
    save_tiny_llm(llm, seed=1)
    second = TransformersQualityScorer(str(llm), device="cpu")(prompts[:20], cache=cache)
    judge(
        "LLM weights replaced at the same path",
        first.num_scored == 20 and second.num_cached == 0 and second.num_scored == 20,
        f"first run scored {first.num_scored}; after replacing the weights: {second.num_cached} served from the "
        f"cache, {second.num_scored} rescored",
    )


def consistent(out: Path) -> tuple[bool, str]:
    """Whether an output directory is one whole output: data rows, report, config and card agree."""
    files = ["report.json", "fifa_config.yaml", "README.md", "data/train-00000-of-00001.parquet"]
    present = [(out / name).exists() for name in files]
    if not any(present):
        return True, "no output yet"
    if not all(present):
        return False, f"partial: {[n for n, p in zip(files, present) if not p]} missing"
    import yaml

    rows = len(pd.read_parquet(out / files[3]))
    report = json.loads((out / "report.json").read_text())["selected"]
    k = yaml.safe_load((out / "fifa_config.yaml").read_text())["k"]
    card = (out / "README.md").read_text()
    return rows == report == k and f"{rows} of the" in card, f"k={k:g}: {rows} rows, report {report}"


def kill(root: Path, models: dict) -> None:
    from fifa_hf.world.synthetic import make_synthetic_pickapic

    source, out = root / "kill-rows", root / "kill-out"
    make_synthetic_pickapic(600, seed=0, image_size=32).save_to_disk(source)
    first = subprocess.Popen([sys.executable, "-m", "fifa_hf.cli", *filter_args(source, out, models, "--k", "100")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    staging = out.parent / f".{out.name}.staging"
    while first.poll() is None and not staging.exists():
        time.sleep(0.005)
    first.send_signal(signal.SIGKILL)
    first.wait()
    zero_bytes = [p.name for p in out.rglob("*.parquet") if p.stat().st_size == 0] if out.exists() else []
    ok, state = consistent(out)
    judge("kill during the first write", ok and not zero_bytes, f"{state}; empty parquet files: {zero_bytes}")

    cli(*filter_args(source, out, models, "--k", "100")).check_returncode()
    outcomes, started = [], time.time()
    full = cli(*filter_args(source, out, models, "--k", "100"))
    duration = time.time() - started
    for trial, delay in enumerate([*np.linspace(0.5, duration, 8), None, None]):
        process = subprocess.Popen(
            [sys.executable, "-m", "fifa_hf.cli", *filter_args(source, out, models, "--k", str(50 + trial))],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
        if delay is None:  # kill the moment the new output is being written
            while process.poll() is None and not staging.exists():
                time.sleep(0.002)
        else:
            time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        outcomes.append(consistent(out))
    cli(*filter_args(source, out, models, "--k", "50"))
    ok, state = consistent(out)
    judge(
        "kill -9 during re-runs",
        full.returncode == 0 and all(o for o, _ in outcomes) and ok and "k=50" in state,
        f"{sum(o for o, _ in outcomes)} of {len(outcomes)} kills left a whole output "
        f"({'; '.join(s for _, s in outcomes)}); after a clean re-run: {state}",
    )


def secrets(root: Path, models: dict) -> None:
    from fifa_hf.world.synthetic import make_synthetic_pickapic

    server = FaultyEndpoint(seed=1)
    source, out = root / "secrets-rows", root / "secrets-out"
    make_synthetic_pickapic(120, seed=0, image_size=32).save_to_disk(source)
    url = f"http://alice:pa55-SECRET@{server.host}/v1?api-key=KEY-SECRET-42&api-version=2024-06-01"
    args = filter_args(source, out, models, "--k", "10")
    args[args.index("heuristic")] = "endpoint"
    process = cli(*args, "--quality_endpoint", url, "--quality_model", "judge", "--quality_timeout", "0.5",
                  "--quality_max_retries", "1", env={"OPENAI_API_KEY": "sk-ENV-SECRET"})  # fmt: skip
    texts = {str(p.relative_to(out)): p.read_bytes().decode("latin-1") for p in out.rglob("*") if p.is_file()}
    texts.update(stdout=process.stdout, stderr=process.stderr)
    leaks = [name for name, text in texts.items() if any(s in text for s in ("SECRET", "alice"))]
    judge(
        "credentials in the endpoint URL",
        process.returncode == 0 and not leaks,
        f"{len(texts)} files and logs searched (parquet, SQLite cache, config, card, report, stdout, stderr); "
        f"secrets found in: {leaks or 'none'}",
    )


def png(image, bits16: bool = False) -> bytes:
    from PIL import Image

    if not bits16:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        return buffer.getvalue()
    import struct
    import zlib

    values = image.astype(np.uint16) * 257
    rows = b"".join(b"\0" + values[y].astype(">u2").tobytes() for y in range(values.shape[0]))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", values.shape[1], values.shape[0], 16, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def images(root: Path, models: dict) -> None:
    import datasets
    from PIL import Image

    from fifa_hf.filter import FiFAConfig, FiFAFilter

    rng = np.random.default_rng(0)
    grey = [rng.integers(0, 256, (48, 64), dtype=np.uint8) for _ in range(24)]

    def margins(jpg_0, jpg_1, name):
        rows = {"caption": [f"p{i}" for i in range(12)], "jpg_0": jpg_0, "jpg_1": jpg_1, "label_0": [1.0] * 12}
        datasets.Dataset.from_dict(rows).save_to_disk(root / name)
        config = FiFAConfig(dataset_name=str(root / name), output_dir=str(root / f"{name}-out"), method="margin", alpha=0,
                            reward_model=str(models["clip"]), k=4, device="cpu")  # fmt: skip
        return FiFAFilter(config).run().scores["margin"].to_numpy()

    eight = margins([png(g) for g in grey[:12]], [png(g) for g in grey[12:]], "png8")
    sixteen = margins([png(g, True) for g in grey[:12]], [png(g, True) for g in grey[12:]], "png16")
    white = (np.asarray(Image.open(io.BytesIO(png(grey[0], True))).convert("RGB")) == 255).mean()
    judge("16-bit PNGs", np.allclose(eight, sixteen), f"max |margin(16-bit) - margin(8-bit)| = "
          f"{np.abs(eight - sixteen).max():.2e}; PIL's plain convert('RGB') reads {white:.0%} of their pixels as white")  # fmt: skip

    def jpeg(array, orientation=None):
        """``orientation`` 6: stored turned a quarter left, with the EXIF tag that turns it back (or without)."""
        image, buffer, exif = Image.fromarray(array), io.BytesIO(), Image.Exif()
        if orientation is not None:
            image = image.transpose(Image.Transpose.ROTATE_90)
            if orientation:
                exif[0x0112] = orientation
        image.save(buffer, format="JPEG", quality=100, exif=exif.tobytes())
        return buffer.getvalue()

    smooth = [np.asarray(Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((64, 48), Image.BICUBIC))
              for _ in range(24)]  # fmt: skip
    versions = {
        name: margins([jpeg(c, o) for c in smooth[:12]], [jpeg(c, o) for c in smooth[12:]], name)
        for name, o in (("upright", None), ("exif", 6), ("no-exif", 0))
    }
    applied = np.abs(versions["exif"] - versions["upright"]).max()
    ignored = np.abs(versions["no-exif"] - versions["upright"]).max()
    judge("EXIF orientation", applied < ignored / 4,
          f"max |margin difference| from the upright images: {applied:.3f} with the EXIF tag applied (JPEG "
          f"re-encoding only) vs {ignored:.3f} for the same rotated images read without it")  # fmt: skip

    from fifa_hf.testing import save_tiny_sd
    from fifa_hf.trainer import DiffusionDPOConfig, DiffusionDPOTrainer
    from fifa_hf.world.synthetic import make_synthetic_pickapic

    rows = make_synthetic_pickapic(12, seed=0, image_size=32, tie_fraction=0, unlabeled_fraction=0,
                                   identical_fraction=0).to_pandas()  # fmt: skip
    rows.at[7, "jpg_0"] = rows.at[7, "jpg_0"][: len(rows.at[7, "jpg_0"]) // 2]
    args = DiffusionDPOConfig(output_dir=str(root / "dpo"), cache_latents=True, max_steps=1, report_to="none",
                              use_cpu=True, per_device_train_batch_size=4, save_strategy="no")  # fmt: skip
    try:
        trainer = DiffusionDPOTrainer(str(save_tiny_sd(root / "sd")), args,
                                      train_dataset=datasets.Dataset.from_pandas(rows, preserve_index=False))  # fmt: skip
        trainer.train()
        report, error = trainer.dataset_reports["train"], None
    except Exception as exception:
        report, error = None, exception
    judge("truncated JPEG in training data", error is None and report.dropped == {"undecodable_image": 1},
          f"{report} ; one training step ran" if error is None else f"{type(error).__name__}: {error}")  # fmt: skip


def k(root: Path, models: dict) -> None:
    from fifa_hf.world.synthetic import make_synthetic_pickapic

    source = root / "k-rows"
    make_synthetic_pickapic(120, seed=0, image_size=32).save_to_disk(source)
    loose = cli(*filter_args(source, root / "k-out", models, "--k", "100000"))
    strict = cli(*filter_args(source, root / "k-strict", models, "--k", "100000", "--strict"))
    warning = [line for line in loose.stderr.splitlines() if "nothing is filtered" in line]
    card = (root / "k-out" / "README.md").read_text().split("\n# ", 1)[1].splitlines()[2]
    judge("k above the pool", bool(warning) and strict.returncode != 0 and card.startswith("All "),
          f"warning: {warning[:1]}; card: {card[:90]!r}; --strict exit code {strict.returncode}")  # fmt: skip


def offline(root: Path, models: dict) -> None:
    from fifa_hf.world.synthetic import make_synthetic_pickapic

    source = root / "offline-rows"
    make_synthetic_pickapic(16, seed=0, image_size=16).save_to_disk(source)
    for label, env in (("no network", {"HF_HUB_OFFLINE": "0", "HF_HOME": str(root / "empty-hf-home")}),
                       ("HF_HUB_OFFLINE=1", {"HF_HOME": str(root / "empty-hf-home")})):  # fmt: skip
        started = time.time()
        process = cli("filter", "--dataset_name", str(source), "--output_dir", str(root / "offline-out"), env=env)
        seconds, message = time.time() - started, process.stderr.strip().splitlines()[-1]
        named = all(part in message for part in ("--reward_model", "yuvalkirstain/PickScore_v1", "hf download"))
        judge(f"default models, {label}", process.returncode != 0 and named and seconds < 30,
              f"failed after {seconds:.1f} s (process start included): {message[:200]}")  # fmt: skip


SCENARIOS = {f.__name__: f for f in (changed, options, endpoint, kill, secrets, images, k, offline)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="+", choices=sorted(SCENARIOS), default=list(SCENARIOS))
    only = parser.parse_args().only
    from fifa_hf.testing import save_tiny_clip

    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        models = {"clip": save_tiny_clip(root / "clip")}
        for name in only:
            SCENARIOS[name](root, models)
    failed = [name for name, ok, _ in RESULTS if not ok]
    print(
        f"\n{len(RESULTS) - len(failed)} of {len(RESULTS)} scenarios pass" + (f"; failing: {failed}" if failed else "")
    )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
