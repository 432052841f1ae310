import json
import os
import re
import signal
import subprocess
import sys
import time
import types

import pandas as pd
import pytest
import yaml
from datasets import load_dataset, load_from_disk
from huggingface_hub import DatasetCard

from fifa_hf.cli import main
from fifa_hf.errors import InputError
from fifa_hf.filter import FiFAConfig, FiFAFilter, reselect
from fifa_hf.scoring.diversity import offline_minilm_path
from fifa_hf.scoring.rewards import CLIPRewardModel
from fifa_hf.storage import StaleScoresError


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    from fifa_hf.world.synthetic import make_synthetic_pickapic

    path = tmp_path_factory.mktemp("source") / "pickapic"
    make_synthetic_pickapic(400, seed=3).save_to_disk(path)
    return path


def filter_args(source_dir, output_dir, tiny_clip_path, tiny_llm_path, *extra):
    return [
        "filter", "--dataset_name", str(source_dir), "--output_dir", str(output_dir),
        "--reward_model", str(tiny_clip_path), "--quality_model", str(tiny_llm_path),
        "--embedding_model", offline_minilm_path(), "--k", "40", "--chunk_size", "64", *extra,
    ]  # fmt: skip


def synthetic_source(path, num_pairs=64, seed=1):
    from fifa_hf.world.synthetic import make_synthetic_pickapic

    make_synthetic_pickapic(num_pairs, seed=seed, image_size=16).save_to_disk(path)
    return path


def cheap_config(source, output_dir, **overrides):
    """Precomputed (true) rewards ranked by margin, no LLM, no embeddings: the filter's bookkeeping, fast."""
    values = dict(
        dataset_name=str(source), output_dir=str(output_dir), reward_type="precomputed",
        reward_columns="true_reward_0,true_reward_1", method="margin", alpha=0, gamma=0, chunk_size=16, k=10,
    )  # fmt: skip
    return FiFAConfig(**{**values, **overrides})


def published_text(directory):
    """Everything a push would publish, as one text (parquet and PNG bytes included)."""
    from fifa_hf.hub import PUBLISHED_PATTERNS

    files = {p for pattern in PUBLISHED_PATTERNS for p in directory.glob(pattern) if p.is_file()}
    return "\n".join(p.read_bytes().decode("latin-1") for p in sorted(files))


def test_filter_cli_end_to_end_and_select_reproduces_it(source_dir, tmp_path, tiny_clip_path, tiny_llm_path, capfd):
    out = tmp_path / "fifa"
    main(filter_args(source_dir, out, tiny_clip_path, tiny_llm_path, "--method", "fifa"))
    captured = capfd.readouterr()
    assert "selected 40 of" in captured.out
    # One bar per long step, each with its total; no bars from internal maps, filters, lookups or loading.
    assert re.search(r"Scoring preference margins: 100%\|[^|]*\| 400/400", captured.err)
    assert "Scoring prompt quality (LLM)" in captured.err and "Embedding prompts" in captured.err
    for noise in ("Map", "Filter", "Adding quality", "Adding diversity", "Loading weights", "Creating parquet"):
        assert noise not in captured.err

    subset = load_dataset(str(out), split="train")
    assert len(subset) == 40
    assert {"caption", "jpg_0", "jpg_1", "label_0", "margin", "quality", "diversity", "fifa_score"} <= set(
        subset.column_names
    )
    assert subset["rank"] == list(range(40))
    assert subset["fifa_score"] == sorted(subset["fifa_score"], reverse=True)

    report = json.loads((out / "report.json").read_text())
    assert report["rows_in"] == 400 and report["not_selected"] == {"below_cutoff": report["rows_kept"] - 40}
    scores = pd.read_parquet(out / "scores.parquet")
    assert len(scores) == 400 and "jpg_0" not in scores and "chosen" not in scores
    assert scores["selected"].sum() == 40

    card = DatasetCard.load(out / "README.md")
    assert card.data.task_categories == ["text-to-image"] and card.data.pretty_name == "FiFA subset of .../pickapic"
    assert card.data.source_datasets == [".../pickapic"] and card.data.size_categories == ["n<1K"]
    assert "fifa" in card.data.tags and card.data.license == "unknown"
    assert "alpha * norm(quality)" in card.text and "arXiv:2410.10166" in card.text
    assert "| not selected: below_cutoff |" in card.text and "(example_pairs.png)" in card.text
    assert (out / "example_pairs.png").exists() and (out / "signal_histograms.png").exists()
    assert str(tmp_path) not in published_text(out) and "<this repo>" not in card.text

    main(["select", "--scores", str(out), "--output_dir", str(tmp_path / "again")])
    again = load_dataset(str(tmp_path / "again"), split="train")
    assert again["ranking_id"] == subset["ranking_id"]

    main(["select", "--scores", str(out), "--output_dir", str(tmp_path / "qsd"), "--method", "qsd", "--k", "0.1"])
    qsd = json.loads((tmp_path / "qsd" / "report.json").read_text())
    assert qsd["selected"] == -(-report["rows_kept"] // 10) and qsd["rows_in"] == 400
    qsd_card = DatasetCard.load(tmp_path / "qsd" / "README.md")
    assert "psi(chosen) * (1 - psi(rejected))" in qsd_card.text and "norm(quality)" not in qsd_card.text
    assert qsd_card.data.pretty_name.startswith("QSD subset")

    main(["select", "--scores", str(out), "--output_dir", str(tmp_path / "capped"), "--max_pairs_per_prompt", "1"])
    capped = load_dataset(str(tmp_path / "capped"), split="train")
    assert len(capped) == len(set(capped["caption"])) == report["unique_prompts"]  # one pair per prompt


def test_yaml_config_and_bad_input(tmp_path, source_dir):
    path = tmp_path / "fifa.yaml"
    path.write_text(f"dataset_name: {source_dir}\nalpha: 0.5\nmethod: margin\n")
    config = FiFAConfig.from_yaml(path, output_dir=str(tmp_path / "o"))
    assert (config.alpha, config.method, config.output_dir) == (0.5, "margin", str(tmp_path / "o"))
    path.write_text("dataset: data/pickapic\nprivate: true\npush_to_hub: user/subset\n")  # an older fifa_config.yaml
    old = FiFAConfig.from_yaml(path)
    assert (old.dataset_name, old.hub_private_repo, old.push_to_hub, old.hub_model_id) == (
        "data/pickapic",
        True,
        True,
        "user/subset",
    )
    path.write_text("aplha: 0.5\n")
    with pytest.raises(ValueError, match="aplha"):
        FiFAConfig.from_yaml(path)
    with pytest.raises(ValueError, match="normalization"):
        FiFAConfig(normalization="rank")
    with pytest.raises(ValueError, match="reward_columns"):
        FiFAConfig(reward_type="precomputed")


def test_every_help_works(capsys):
    for command in ("filter", "select"):
        with pytest.raises(SystemExit) as exit:
            main([command, "--help"])
        assert exit.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--dataset_name" in text and "--hub_private_repo" in text and "5.33 percent" in text
    script = os.path.join(os.path.dirname(__file__), "..", "dataset_scripts", "pickapic_fifa.py")
    process = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True)
    assert process.returncode == 0 and "--quality_timeout" in process.stdout, process.stderr[-2000:]


def test_missing_prompt_column_names_it(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"jpg_0": [b"x"], "jpg_1": [b"y"], "label_0": [1.0]}).save_to_disk(tmp_path / "bad")
    config = FiFAConfig(dataset_name=str(tmp_path / "bad"), output_dir=str(tmp_path / "o"), method="margin", alpha=0)
    with pytest.raises(ValueError, match="caption"):
        FiFAFilter(config, reward_model=CLIPRewardModel("never-loaded")).run()


def test_without_network_the_filter_fails_before_any_work_naming_flag_model_and_fix(tmp_path, monkeypatch, capsys):
    from fifa_hf.resolve import ResolutionError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = synthetic_source(tmp_path / "rows", 8)
    out = tmp_path / "o"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["filter", "--dataset_name", str(source), "--output_dir", str(out)])  # the default Hub models
    assert exit_.value.code == 2  # a usage error, without a traceback
    message = capsys.readouterr().err
    assert message.startswith("fifa-hf filter: error: ")
    assert "--reward_model" in message and "yuvalkirstain/PickScore_v1" in message and "hf download" in message
    assert not out.exists()  # nothing was scored
    with pytest.raises(ResolutionError, match=r"--dataset_name: the local path .*nowhere.* does not exist"):
        FiFAFilter(cheap_config(tmp_path / "nowhere", out)).run()
    checkpoint = tmp_path / "hps_v2.pt"
    checkpoint.write_bytes(b"weights")
    with pytest.raises(ResolutionError, match="--reward_type open_clip --reward_model <architecture"):
        FiFAFilter(FiFAConfig(reward_model=str(checkpoint), method="margin", output_dir=str(out)))


def test_changed_rows_at_the_same_path_are_rescored_never_mixed(tmp_path, tiny_clip_path, caplog):
    source, out = tmp_path / "rows", tmp_path / "out"
    synthetic_source(source, 60, seed=1)  # parts of 16, 16, 16 and 12 rows
    config = dict(reward_model=str(tiny_clip_path), reward_type="clip", reward_columns=None, k=60)
    FiFAFilter(cheap_config(source, out, **config)).run()

    import datasets

    rows = datasets.load_from_disk(str(source)).to_pandas()
    rows.loc[20:23, "caption"] = "a brand new prompt"  # rows 20-23 live in part 1 (rows 16-31)
    flipped = rows.index[32:48][rows["label_0"][32:48] == 1.0][0]  # a label in part 2: chosen and rejected swap
    rows.loc[flipped, "label_0"], rows.loc[flipped, "label_1"] = 0.0, 1.0
    (source.parent / "rows-new").mkdir()
    datasets.Dataset.from_pandas(rows, preserve_index=False).save_to_disk(source.parent / "rows-new")
    os.rename(source, source.parent / "rows-old")
    os.rename(source.parent / "rows-new", source)  # same path, new content

    with caplog.at_level("WARNING", logger="fifa_hf"):
        result = FiFAFilter(cheap_config(source, out, **config)).run()
    assert (result.report.resumed_rows, result.report.rescored_rows) == (28, 32)  # parts 0 and 3 reused
    assert "Rows 16-31 changed since they were scored" in caplog.text
    assert "Rows 32-47 changed since they were scored" in caplog.text
    fresh = FiFAFilter(cheap_config(source, tmp_path / "fresh", **config)).run()
    pd.testing.assert_frame_equal(result.scores, fresh.scores)  # as if scored from scratch
    selected = result.scores[result.scores["selected"]].sort_values("rank")
    assert result.subset["caption"] == selected["prompt"].tolist()  # every row was scored on its own prompt


def test_options_that_change_scores_are_refused_naming_them(tmp_path):
    from fifa_hf.testing import save_tiny_clip

    source, out, clip = synthetic_source(tmp_path / "rows", 32), tmp_path / "out", tmp_path / "clip"
    save_tiny_clip(clip, seed=0)
    config = dict(reward_model=str(clip), reward_type="clip", reward_columns=None)
    FiFAFilter(cheap_config(source, out, **config)).run()
    with pytest.raises(StaleScoresError, match=r"dtype: 'float32' -> 'bfloat16'.*delete"):
        FiFAFilter(cheap_config(source, out, dtype="bfloat16", **config)).run()
    save_tiny_clip(clip, seed=1)  # other weights at the same path
    with pytest.raises(StaleScoresError, match=r"reward: 'clip:sha256:"):
        FiFAFilter(cheap_config(source, out, **config)).run()


def test_an_interrupted_rewrite_leaves_the_old_output_whole(tmp_path, monkeypatch):
    import fifa_hf.hub
    import fifa_hf.storage

    source, out = synthetic_source(tmp_path / "rows", 64), tmp_path / "out"
    FiFAFilter(cheap_config(source, out, k=30)).run()

    def consistent(k):
        report = json.loads((out / "report.json").read_text())
        data = pd.read_parquet(out / "data" / "train-00000-of-00001.parquet")
        config = FiFAConfig.from_yaml(out / "fifa_config.yaml")
        return report["selected"] == len(data) == config.k == k and f"{k} of the" in (out / "README.md").read_text()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stands in for a kill; tests/../benchmarks/filter_faults.py uses SIGKILL

    monkeypatch.setattr(fifa_hf.hub, "dataset_card", killed)  # after the data, before the card
    with pytest.raises(KeyboardInterrupt):
        FiFAFilter(cheap_config(source, out, k=10)).run()
    assert consistent(30) and not (out.parent / ".out.staging").exists()

    monkeypatch.undo()
    monkeypatch.setattr(fifa_hf.storage, "_exchange", killed)  # resume state already moved to the new output
    with pytest.raises(KeyboardInterrupt):
        FiFAFilter(cheap_config(source, out, k=10)).run()
    assert consistent(30) and not (out / "scores_parts").exists()

    monkeypatch.undo()
    result = FiFAFilter(cheap_config(source, out, k=10)).run()  # recovers the parts, then writes whole
    assert consistent(10) and result.report.resumed_rows == 64
    assert sorted(p.name for p in out.parent.iterdir()) == ["out", "rows"]


def test_k_at_or_above_the_pool_warns_or_fails_when_strict(tmp_path, caplog):
    source = synthetic_source(tmp_path / "rows", 32)
    with caplog.at_level("WARNING", logger="fifa_hf"):
        result = FiFAFilter(cheap_config(source, tmp_path / "o", k=100000)).run()
    assert f"k=100000 keeps all {result.report.rows_kept} scored pairs" in caplog.text
    card = (tmp_path / "o" / "README.md").read_text()
    assert f"All {result.report.rows_kept} scored preference pairs" in card and "most informative" not in card
    with pytest.raises(ValueError, match="nothing is filtered out"):
        FiFAFilter(cheap_config(source, tmp_path / "o2", k=100000, strict=True)).run()
    FiFAFilter(cheap_config(source, tmp_path / "o3", k=None)).run()  # the default K, 5000, is above the pool too
    assert "k = 5000 is at or above" in (tmp_path / "o3" / "README.md").read_text()


def test_max_pairs_per_prompt_and_signed_margins_reach_the_filter(tmp_path):
    source = synthetic_source(tmp_path / "rows", 64)
    result = FiFAFilter(cheap_config(source, tmp_path / "o", max_pairs_per_prompt=1)).run()
    chosen = result.scores[result.scores["selected"]]
    assert chosen["prompt"].is_unique and len(chosen) == chosen["prompt"].nunique() == result.report.selected
    assert result.report.not_selected["max_pairs_per_prompt"] > 0
    scored = result.scores[result.scores["drop_reason"] == ""]
    assert FiFAConfig().margin_mode == "signed"  # the default
    assert (scored["margin"] < 0).any()  # pairs the reward disagrees with keep their sign
    pd.testing.assert_series_equal(
        scored["margin"], scored["reward_chosen"] - scored["reward_rejected"], check_names=False
    )


def test_push_to_hub_creates_the_repo_first_then_sends_the_subset_card_and_privacy(
    source_dir, tmp_path, monkeypatch, capsys
):
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, RepoUrl

    sent = []
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token")
    earlier_upload = [
        ".gitattributes",
        "README.md",
        "data/train-00000-of-00002.parquet",
        "data/train-00001-of-00002.parquet",
    ]

    def create_repo(self, repo_id, **kwargs):
        sent.append(("create_repo", repo_id, kwargs, self.token, (out / "data").exists()))
        return RepoUrl(f"https://huggingface.co/datasets/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        added = {op.path_in_repo: op.path_or_fileobj for op in operations if isinstance(op, CommitOperationAdd)}
        deleted = [op.path_in_repo for op in operations if isinstance(op, CommitOperationDelete)]
        sent.append(("create_commit", repo_id, kwargs["repo_type"], added, deleted))
        return f"https://huggingface.co/datasets/{repo_id}/commit/abc"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(HfApi, "list_repo_files", lambda self, repo_id, **kwargs: earlier_upload)
    monkeypatch.setattr(HfApi, "whoami", lambda self, *a, **k: {"name": "someone"})
    source, out = synthetic_source(tmp_path / "rows", 32), tmp_path / "fifa"
    main([
        "filter", "--dataset_name", str(source), "--output_dir", str(out), "--reward_type", "precomputed",
        "--reward_columns", "true_reward_0,true_reward_1", "--method", "margin", "--alpha", "0", "--k", "8",
        "--push_to_hub", "--hub_model_id", "user/pickapic-fifa", "--hub_private_repo", "true",
    ])  # fmt: skip
    (_, repo_id, kwargs, token, written), _, (_, commit_repo, repo_type, files, deleted) = sent
    assert not written  # the repo (and the token's write access) was checked before any work
    assert (repo_id, kwargs["repo_type"], kwargs["private"], token) == (
        "user/pickapic-fifa",
        "dataset",
        True,
        "hf_secret_token",
    )
    assert (commit_repo, repo_type) == ("user/pickapic-fifa", "dataset")
    assert set(files) == {
        "README.md", "data/train-00000-of-00001.parquet", "scores.parquet", "fifa_config.yaml", "report.json",
        "signal_histograms.png", "example_pairs.png",
    }  # fmt: skip
    assert deleted == earlier_upload[2:]  # load_dataset would read the earlier shards beside the new rows
    card = open(files["README.md"]).read()
    assert card.startswith("---\nlicense: unknown") and 'load_dataset("user/pickapic-fifa"' in card
    assert "pushed to https://huggingface.co/datasets/user/pickapic-fifa" in capsys.readouterr().out
    assert "hf_secret_token" not in published_text(out)

    sent.clear()
    main(["select", "--scores", str(out), "--output_dir", str(tmp_path / "qsd-subset"), "--method", "qsd",
          "--push_to_hub", "true"])  # fmt: skip
    (_, repo_id, kwargs, _, _), _, (_, _, _, files, _) = sent
    assert (repo_id, kwargs["private"]) == ("someone/qsd-subset", None)  # TRL's default: the output dir's name
    assert 'load_dataset("someone/qsd-subset"' in open(files["README.md"]).read()
    assert "pushed to https://huggingface.co/datasets/someone/qsd-subset" in capsys.readouterr().out


@pytest.mark.parametrize("refusal", ["no token", "read-only token"])
def test_a_push_the_token_cannot_make_fails_before_any_work(tmp_path, monkeypatch, refusal):
    import requests
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    def create_repo(self, repo_id, **kwargs):
        if refusal == "no token":
            raise LocalTokenNotFoundError("Token is required")
        response = requests.Response()
        response.status_code = 403
        raise HfHubHTTPError("403 Forbidden: You don't have the rights to create a dataset", response=response)

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    config = cheap_config(tmp_path / "missing-rows", tmp_path / "out", push_to_hub=True, hub_model_id="user/x")
    with pytest.raises(InputError, match=r"--push_to_hub.*Set HF_TOKEN to a token with write access"):
        FiFAFilter(config)
    assert not (tmp_path / "out").exists()


def test_killed_filter_resumes_without_rescoring_and_gives_the_same_subset(
    source_dir, tmp_path, tiny_clip_path, tiny_llm_path, capsys
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
    assert (report["resumed_rows"], report["rescored_rows"]) == (16 * len(parts_before), 0)
    assert f"margins of {16 * len(parts_before)} rows reused, 0 rescored" in capsys.readouterr().out
    assert all((out / "scores_parts" / name).stat().st_mtime_ns == mtime for name, mtime in parts_before.items())
    assert (
        load_dataset(str(out), split="train")["ranking_id"]
        == load_dataset(str(reference), split="train")["ranking_id"]
    )

    main(args)  # a finished run asks the LLM nothing again
    report = json.loads((out / "report.json").read_text())
    assert report["quality_scored"] == 0 and report["quality_cached"] == report["unique_prompts"]
    assert report["resumed_rows"] == 400


def test_pickapic_dataset_script_runs_the_same_pipeline_on_local_data(source_dir, tmp_path, tiny_clip_path):
    import runpy

    script = runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "dataset_scripts", "pickapic_fifa.py"))
    script["main"]([
        "--dataset_name", str(source_dir), "--streaming", "true", "--output_dir", str(tmp_path / "out"),
        "--reward_model", str(tiny_clip_path), "--reward_processor", str(tiny_clip_path),
        "--quality_scorer", "heuristic", "--embedding_model", offline_minilm_path(), "--k", "25",
        "--dtype", "float32", "--device", "cpu",
    ])  # fmt: skip
    streamed = load_dataset(str(tmp_path / "out"), split="train")
    assert len(streamed) == 25 and streamed["rank"] == list(range(25))
    recorded = FiFAConfig.from_yaml(tmp_path / "out" / "fifa_config.yaml")
    assert recorded.streaming and (recorded.chunk_size, recorded.batch_size, recorded.split) == (16384, 128, "train")
    from fifa_hf.data import to_preference_pairs

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    _, map_style = to_preference_pairs(load_from_disk(str(source_dir)))
    assert report["rows_in"] == 400 and report["steps"][0]["dropped"] == map_style.dropped  # streaming: same rows


def test_an_output_dir_that_is_not_a_fifa_output_is_refused_before_any_work(tmp_path):
    source = synthetic_source(tmp_path / "rows", 16)
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "important.csv").write_text("a,b\n")
    (project / "photo.png").write_bytes(b"not a figure of ours")
    with pytest.raises(InputError, match=r"--output_dir .*project is not empty and not a fifa-hf output \(it holds data, photo.png\)"):  # fmt: skip
        FiFAFilter(cheap_config(source, project))
    assert sorted(p.name for p in project.rglob("*")) == ["data", "important.csv", "photo.png"]
    with pytest.raises(InputError, match=r"--output_dir .* holds the source rows"):
        FiFAFilter(cheap_config(source, tmp_path))

    out = tmp_path / "out"
    out.mkdir()  # an empty directory may be written to, and an earlier output rewritten
    FiFAFilter(cheap_config(source, out, k=10)).run()
    assert len(load_dataset(str(out), split="train")) == 10
    FiFAFilter(cheap_config(source, out, k=5)).run()
    assert len(load_dataset(str(out), split="train")) == 5  # the new rows, not datasets' cache of the old
    with pytest.raises(InputError, match=r"--output_dir .*project is not empty and not a fifa-hf output"):
        reselect(out, project, k=3)
    assert sorted(p.name for p in project.rglob("*")) == ["data", "important.csv", "photo.png"]


@pytest.mark.parametrize("streaming", [False, True])
def test_select_refuses_source_rows_that_are_not_the_ones_scored(tmp_path, streaming):
    source = synthetic_source(tmp_path / "rows", 64)
    FiFAFilter(cheap_config(source, tmp_path / "out")).run()
    load_from_disk(str(source)).shuffle(seed=0).flatten_indices().save_to_disk(tmp_path / "shuffled")

    with pytest.raises(InputError, match=r"not the ones that were scored: \d+ of 10 selected rows differ, e.g. row"):
        reselect(tmp_path / "out", tmp_path / "again", dataset_name=str(tmp_path / "shuffled"), streaming=streaming)
    assert not (tmp_path / "again").exists()
    again = reselect(tmp_path / "out", tmp_path / "again", streaming=streaming)  # the source the filter read
    assert again.subset["caption"] == again.scores.query("selected").sort_values("rank")["prompt"].tolist()


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"k": 1.5}, "k must be a positive count or a fraction"),
        ({"k": 0}, "k must be a positive count or a fraction"),
        ({"k": float("nan")}, "k must be a positive count or a fraction"),
        ({"knn_k": 0}, "knn_k must be a whole number >= 1"),
        ({"max_pairs_per_prompt": 0}, "max_pairs_per_prompt must be a whole number >= 1"),
        ({"chunk_size": 0}, "chunk_size must be a whole number >= 1"),
        ({"quality_threshold": float("nan")}, "quality_threshold must be a finite number"),
    ],
)
def test_bad_selection_settings_fail_when_the_config_is_built(setting, message):
    with pytest.raises(ValueError, match=message):
        FiFAConfig(**setting)


def test_methods_that_do_not_read_quality_never_score_it(tmp_path):
    source = synthetic_source(tmp_path / "rows", 32)
    # alpha weighs quality only in fifa's score: margin ranking must not need (or resolve) the judge
    config = cheap_config(source, tmp_path / "out", alpha=1.0, quality_model=str(tmp_path / "no-such-judge"))
    result = FiFAFilter(config).run()
    assert "quality" not in result.scores
    assert [step.step for step in result.report.steps] == ["to_preference_pairs", "margin"]
    with pytest.raises(InputError, match=r"--method setwise reads quality, which these scores do not hold"):
        reselect(tmp_path / "out", tmp_path / "setwise", method="setwise")


def test_num_proc_workers_load_the_reward_model_once_per_run_and_score_as_one_process(tmp_path, tiny_clip_path):
    from counting_reward import CountingCLIPReward

    source = synthetic_source(tmp_path / "rows", 48)  # three parts of 16 rows
    config = dict(reward_model=str(tiny_clip_path), reward_type="clip", reward_columns=None, k=20)
    single = FiFAFilter(cheap_config(source, tmp_path / "single", **config)).run()

    loads = tmp_path / "loads.txt"
    reward = CountingCLIPReward(tiny_clip_path, loads)
    workers = FiFAFilter(cheap_config(source, tmp_path / "workers", num_proc=2, **config), reward_model=reward).run()

    pids = loads.read_text().split()
    assert len(pids) == 2 and len(set(pids)) == 2 and str(os.getpid()) not in pids  # one load per worker process
    pd.testing.assert_frame_equal(workers.scores, single.scores, rtol=1e-5)
    assert workers.subset["ranking_id"] == single.subset["ranking_id"]


@pytest.fixture
def hub_dataset(tmp_path, monkeypatch):
    """`org/pairs` on a stand-in Hub: the cache knows its branch `main` and tag `v1` (read offline), and the
    Hub's data servers, which cannot run here, answer from one local dataset per commit, recording each request."""
    import datasets
    import huggingface_hub

    commits = {
        "1" * 40: synthetic_source(tmp_path / "at-v1", 48, seed=1),
        "2" * 40: synthetic_source(tmp_path / "at-main", 48, seed=2),
    }
    repo = tmp_path / "hub-cache" / "datasets--org--pairs"
    for commit in commits:
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "README.md").write_text("---\nlicense: mit\n---\n")
    (repo / "refs").mkdir()
    (repo / "refs" / "v1").write_text("1" * 40)
    (repo / "refs" / "main").write_text("2" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))

    requests, load_dataset, load_builder = [], datasets.load_dataset, datasets.load_dataset_builder

    def hub_load_dataset(path, *args, revision=None, streaming=False, **kwargs):
        if path != "org/pairs":
            return load_dataset(path, *args, revision=revision, streaming=streaming, **kwargs)
        requests.append(("rows", revision))
        rows = load_from_disk(str(commits[revision]))
        return rows.to_iterable_dataset() if streaming else rows

    def hub_load_builder(path, *args, revision=None, **kwargs):
        if path != "org/pairs":
            return load_builder(path, *args, revision=revision, **kwargs)
        requests.append(("files", revision))
        return types.SimpleNamespace(config=types.SimpleNamespace(data_files={"train": [f"hf://{revision}.parquet"]}))

    monkeypatch.setattr(datasets, "load_dataset", hub_load_dataset)
    monkeypatch.setattr(datasets, "load_dataset_builder", hub_load_builder)
    return requests


def test_a_hub_source_is_read_at_one_commit_which_the_card_records_and_select_reads_again(tmp_path, hub_dataset):
    v1, main_commit = "1" * 40, "2" * 40
    result = FiFAFilter(cheap_config("org/pairs", tmp_path / "out", dataset_revision="v1")).run()
    assert hub_dataset == [("files", v1), ("rows", v1)]  # the tag, pinned to its commit
    assert yaml.safe_load((tmp_path / "out" / "fifa_config.yaml").read_text())["dataset_revision"] == v1
    assert (
        f"scored preference pairs of `org/pairs` at commit `{v1}`"
        in DatasetCard.load(tmp_path / "out" / "README.md").text
    )
    v1_prompts = set(load_from_disk(str(tmp_path / "at-v1"))["caption"])
    assert set(result.subset["caption"]) <= v1_prompts

    hub_dataset.clear()
    again = reselect(tmp_path / "out", tmp_path / "again", k=5)  # main has moved on; select reads v1's rows
    assert hub_dataset == [("files", v1), ("rows", v1)]
    assert again.subset["caption"] == again.scores.query("selected").sort_values("rank")["prompt"].tolist()

    hub_dataset.clear()
    FiFAFilter(cheap_config("org/pairs", tmp_path / "latest")).run()  # no revision: main, as it is now
    assert hub_dataset == [("files", main_commit), ("rows", main_commit)]
    assert f"`org/pairs` at commit `{main_commit}`" in DatasetCard.load(tmp_path / "latest" / "README.md").text

    with pytest.raises(InputError, match=r"--dataset_name: .* is a local dataset; a revision applies to Hub datasets"):
        FiFAFilter(cheap_config(tmp_path / "at-v1", tmp_path / "local", dataset_revision="v1")).run()


def test_images_referenced_by_local_path_are_published_as_bytes_without_the_path(tmp_path):
    import datasets
    import pyarrow.parquet as pq

    from fifa_hf.hub import embedded

    rows = load_from_disk(str(synthetic_source(tmp_path / "rows", 16))).to_dict()
    for column in ("jpg_0", "jpg_1"):  # an image folder's dataset: each cell names a file on this machine
        for index, image in enumerate(rows[column]):
            (tmp_path / f"{column}-{index}.png").write_bytes(image)
        rows[column] = [str(tmp_path / f"{column}-{index}.png") for index in range(16)]
    source = (
        datasets.Dataset.from_dict(rows).cast_column("jpg_0", datasets.Image()).cast_column("jpg_1", datasets.Image())
    )

    FiFAFilter(cheap_config(tmp_path / "unused", tmp_path / "out", k=4)).run(source)
    published = pq.read_table(tmp_path / "out" / "data" / "train-00000-of-00001.parquet").to_pylist()
    assert len(published) == 4
    for row in published:
        for column in ("jpg_0", "jpg_1"):
            assert row[column]["bytes"] == (tmp_path / row[column]["path"]).read_bytes()  # the file itself, by name
    assert str(tmp_path) not in published_text(tmp_path / "out")
    plain = load_from_disk(str(tmp_path / "rows"))  # images as bytes, Pick-a-Pic's way: nothing to embed
    assert embedded(plain) is plain  # written from the memory-mapped files, never copied into memory


def test_a_source_without_one_scorable_pair_fails_and_writes_nothing(tmp_path):
    import datasets

    rows = load_from_disk(str(synthetic_source(tmp_path / "rows", 16))).to_pandas()
    rows["true_reward_0"] = None  # no row has a reward for its first image
    datasets.Dataset.from_pandas(rows, preserve_index=False).save_to_disk(tmp_path / "unrewarded")
    with pytest.raises(
        InputError, match=r"None of the 16 source rows became a scored pair \({'missing_reward': 15, 'tie': 1}\)"
    ):
        FiFAFilter(cheap_config(tmp_path / "unrewarded", tmp_path / "out")).run()
    assert not (tmp_path / "out" / "data").exists()


def test_pairs_a_full_prompt_kept_out_are_reported_as_capped_even_when_k_is_not_reached(tmp_path):
    from fifa_hf.filter import FilterReport, apply_selection, finish_report

    scores = pd.DataFrame({
        "row_id": [0, 1, 2], "prompt": ["a", "a", "b"], "margin": [3.0, 0.1, 2.0], "drop_reason": ["", "", ""],
        "reward_chosen": [1.0, 1.0, 1.0], "reward_rejected": [0.0, 0.9, 0.0],
    })  # fmt: skip
    config = FiFAConfig(method="margin", alpha=0, gamma=0, k=3, max_pairs_per_prompt=1)
    report = FilterReport()
    finish_report(report, apply_selection(scores, config), config)
    assert report.selected == 2 and report.not_selected == {"max_pairs_per_prompt": 1}  # not "below_cutoff"


def test_an_empty_streamed_source_fails_and_writes_nothing(tmp_path):
    import datasets

    features = load_from_disk(str(synthetic_source(tmp_path / "rows", 16))).features
    no_rows = datasets.IterableDataset.from_generator(lambda: iter(()), features=features)  # a split left empty
    with pytest.raises(InputError, match=r"The source has no rows \(split 'train'\)"):
        FiFAFilter(cheap_config(tmp_path / "unused", tmp_path / "out")).run(no_rows)
    assert not (tmp_path / "out" / "data").exists()
