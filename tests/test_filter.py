import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from datasets import load_dataset
from huggingface_hub import DatasetCard

from fifa_hf.cli import main
from fifa_hf.filter import FiFAConfig, FiFAFilter
from fifa_hf.scoring.diversity import offline_minilm_path


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    from fifa_hf.world.synthetic import make_synthetic_pickapic

    path = tmp_path_factory.mktemp("source") / "pickapic"
    make_synthetic_pickapic(400, seed=3).save_to_disk(path)
    return path


def filter_args(source_dir, output_dir, tiny_clip_path, tiny_llm_path, *extra):
    return [
        "filter", "--dataset", str(source_dir), "--output_dir", str(output_dir),
        "--reward_model", str(tiny_clip_path), "--quality_model", str(tiny_llm_path),
        "--embedding_model", offline_minilm_path(), "--k", "40", "--chunk_size", "64", *extra,
    ]  # fmt: skip


def test_filter_cli_end_to_end_and_select_reproduces_it(source_dir, tmp_path, tiny_clip_path, tiny_llm_path, capsys):
    out = tmp_path / "fifa"
    main(filter_args(source_dir, out, tiny_clip_path, tiny_llm_path, "--method", "fifa"))
    assert "selected 40 of" in capsys.readouterr().out

    subset = load_dataset(str(out), split="train")
    assert len(subset) == 40
    assert {"caption", "jpg_0", "jpg_1", "label_0", "margin", "quality", "diversity", "fifa_score"} <= set(
        subset.column_names
    )
    assert subset["rank"] == list(range(40))
    assert subset["fifa_score"] == sorted(subset["fifa_score"], reverse=True)

    report = json.loads((out / "report.json").read_text())
    assert report["rows_in"] == 400 == report["rows_kept"] + sum(report["dropped"].values())
    scores = pd.read_parquet(out / "scores.parquet")
    assert len(scores) == 400 and "jpg_0" not in scores and "chosen" not in scores
    assert scores["selected"].sum() == 40

    card = DatasetCard.load(out / "README.md")
    assert card.data.task_categories == ["text-to-image"]
    assert card.data.source_datasets == [str(source_dir)] and card.data.size_categories == ["n<1K"]
    assert "fifa" in card.data.tags and card.data.license == "unknown"
    assert "alpha: 1.0" in card.text and "arXiv:2410.10166" in card.text and (out / "margin_histogram.png").exists()

    main(["select", "--scores", str(out), "--output_dir", str(tmp_path / "again")])
    again = load_dataset(str(tmp_path / "again"), split="train")
    assert again["ranking_id"] == subset["ranking_id"]

    main(["select", "--scores", str(out), "--output_dir", str(tmp_path / "qsd"), "--method", "qsd", "--k", "0.1"])
    qsd = json.loads((tmp_path / "qsd" / "report.json").read_text())
    assert qsd["selected"] == -(-report["rows_kept"] // 10) and qsd["rows_in"] == 400
    assert "method: qsd" in (tmp_path / "qsd" / "README.md").read_text()


def test_yaml_config_and_bad_input(tmp_path, source_dir):
    path = tmp_path / "fifa.yaml"
    path.write_text(f"dataset: {source_dir}\nalpha: 0.5\nmethod: margin\n")
    config = FiFAConfig.from_yaml(path, output_dir=str(tmp_path / "o"))
    assert (config.alpha, config.method, config.output_dir) == (0.5, "margin", str(tmp_path / "o"))
    path.write_text("aplha: 0.5\n")
    with pytest.raises(ValueError, match="aplha"):
        FiFAConfig.from_yaml(path)
    with pytest.raises(ValueError, match="normalization"):
        FiFAConfig(normalization="rank")
    with pytest.raises(ValueError, match="reward_columns"):
        FiFAConfig(reward_type="precomputed")


def test_missing_prompt_column_names_it(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"jpg_0": [b"x"], "jpg_1": [b"y"], "label_0": [1.0]}).save_to_disk(tmp_path / "bad")
    config = FiFAConfig(dataset=str(tmp_path / "bad"), output_dir=str(tmp_path / "o"), alpha=0, gamma=0)
    with pytest.raises(ValueError, match="caption"):
        FiFAFilter(config, reward_model=object()).run()


def test_push_to_hub_sends_the_subset_and_card(source_dir, tmp_path, tiny_clip_path, tiny_llm_path, monkeypatch):
    from huggingface_hub import HfApi

    sent = {}
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token")
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: sent.update(repo=(repo_id, kw, self.token)))

    def create_commit(self, repo_id, operations, **kwargs):
        sent["commit"] = (repo_id, kwargs["repo_type"], {op.path_in_repo: op.path_or_fileobj for op in operations})
        return "https://huggingface.co/datasets/user/pickapic-fifa/commit/abc"

    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    out = tmp_path / "fifa"
    main(
        filter_args(
            source_dir, out, tiny_clip_path, tiny_llm_path, "--push_to_hub", "user/pickapic-fifa", "--gamma", "0"
        )
    )
    repo_id, kwargs, token = sent["repo"]
    assert repo_id == "user/pickapic-fifa" and kwargs["repo_type"] == "dataset" and token == "hf_secret_token"
    repo_id, repo_type, files = sent["commit"]
    assert (repo_id, repo_type) == ("user/pickapic-fifa", "dataset")
    assert set(files) == {
        "README.md", "data/train-00000-of-00001.parquet", "scores.parquet", "fifa_config.yaml", "report.json",
        "margin_histogram.png",
    }  # fmt: skip
    card = open(files["README.md"]).read()
    assert card.startswith("---\nlicense: unknown") and "task_categories" in card
    assert "hf_secret_token" not in (out / "fifa_config.yaml").read_text()


def test_killed_filter_resumes_without_rescoring_and_gives_the_same_subset(
    source_dir, tmp_path, tiny_clip_path, tiny_llm_path
):
    reference = tmp_path / "reference"
    main(filter_args(source_dir, reference, tiny_clip_path, tiny_llm_path, "--chunk_size", "16"))

    out = tmp_path / "interrupted"
    args = filter_args(source_dir, out, tiny_clip_path, tiny_llm_path, "--chunk_size", "16")
    process = subprocess.Popen(
        [sys.executable, "-m", "fifa_hf.cli", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    deadline = time.time() + 120
    while len(list((out / "scores_parts").glob("part-*.parquet"))) < 3 and time.time() < deadline:
        assert process.poll() is None, "the filter finished before it could be interrupted"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    parts_before = {p.name: p.stat().st_mtime_ns for p in (out / "scores_parts").glob("part-*.parquet")}
    assert 3 <= len(parts_before) < 25 and not (out / "report.json").exists()

    main(args)
    report = json.loads((out / "report.json").read_text())
    assert report["resumed_rows"] == 16 * len(parts_before)
    assert all((out / "scores_parts" / name).stat().st_mtime_ns == mtime for name, mtime in parts_before.items())
    assert (
        load_dataset(str(out), split="train")["ranking_id"]
        == load_dataset(str(reference), split="train")["ranking_id"]
    )

    main(args)  # a finished run asks the LLM nothing again
    report = json.loads((out / "report.json").read_text())
    assert report["quality_scored"] == 0 and report["quality_cached"] == report["unique_prompts"]


def test_pickapic_dataset_script_runs_the_same_pipeline_on_local_data(source_dir, tmp_path, tiny_clip_path):
    import runpy

    script = runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "dataset_scripts", "pickapic_fifa.py"))
    config = script["main"]([
        "--dataset", str(source_dir), "--streaming", "true", "--output_dir", str(tmp_path / "out"),
        "--reward_model", str(tiny_clip_path), "--reward_processor", str(tiny_clip_path),
        "--quality_scorer", "heuristic", "--embedding_model", offline_minilm_path(), "--k", "25",
        "--dtype", "float32", "--device", "cpu",
    ])  # fmt: skip
    assert config.streaming and config.reward_model == str(tiny_clip_path)
    streamed = load_dataset(str(tmp_path / "out"), split="train")
    assert len(streamed) == 25 and streamed["rank"] == list(range(25))
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["rows_in"] == 400 == report["rows_kept"] + sum(report["dropped"].values())
