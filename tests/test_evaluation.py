import json
import os
import shutil
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from huggingface_hub.utils import filter_repo_objects
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image

from fifa_hf.cli import main
from fifa_hf.evaluation import (
    GenerationSettings,
    RewardEvaluationCallback,
    bootstrap_interval,
    generate,
    load_for_evaluation,
    load_prompts,
    partiprompts,
    per_prompt_means,
    summarize,
    win_rate,
)
from fifa_hf.resolve import DIFFUSERS_PIPELINE_FILES
from fifa_hf.scoring import CLIPRewardModel
from fifa_hf.scoring.rewards import load_reward_model
from fifa_hf.testing import tiny_sd_pipeline
from fifa_hf.trainer import DiffusionDPOConfig, DiffusionDPOTrainer
from fifa_hf.world.synthetic import make_synthetic_pickapic
from fifa_hf.world.true_reward import true_reward

# Prompts in the synthetic world's grammar, so its true reward can score them too.
PROMPTS = [
    "one outlined red circle, gray background",
    "three yellow squares on a gray background, filled",
    "four outlined yellow squares, gray background",
]


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n\n" + PROMPTS[0] + "\n")  # a blank line and a duplicate
    return path


def evaluate_cli(tmp_path, tiny_sd_path, prompt_file, reward, *extra):
    output_dir = tmp_path / "eval"
    main([
        "evaluate", "--model_name_or_path", str(tiny_sd_path), "--baseline_model_name_or_path", str(tiny_sd_path),
        "--prompts", str(prompt_file), "--reward", reward, "--num_images_per_prompt", "2",
        "--num_inference_steps", "2", "--guidance_scale", "3.0", "--output_dir", str(output_dir), *extra,
    ])  # fmt: skip
    return output_dir, json.loads((output_dir / "results.json").read_text())


def test_evaluate_writes_images_results_table_and_grid(tmp_path, tiny_sd_path, tiny_clip_path, prompt_file, capsys):
    reward = f"clip:{tiny_clip_path},synthetic"  # a CLIP checkpoint and the registered synthetic true reward
    output_dir, results = evaluate_cli(tmp_path, tiny_sd_path, prompt_file, reward)
    assert results["num_prompts"] == 3
    assert len(list((output_dir / "images" / "model").glob("*.png"))) == 6
    assert len(list((output_dir / "images" / "baseline").glob("*.png"))) == 6
    generation = results["generation"]
    assert generation["scheduler"] == "DDPMScheduler"
    assert (generation["num_inference_steps"], generation["guidance_scale"]) == (2, 3.0)
    clip = results["rewards"]["tiny-clip"]  # named after the checkpoint that scored
    assert clip["model"]["n"] == 6 and clip["model"]["ci_low"] <= clip["model"]["mean"] <= clip["model"]["ci_high"]
    table = (output_dir / "results.md").read_text()
    assert "| tiny-clip |" in table and "win rate" in table and "DDPMScheduler, 2 steps, guidance 3.0" in table
    with Image.open(output_dir / "grid.png") as grid:
        assert grid.width == 2 * 128  # model beside baseline

    # The baseline is the same model with the same per-prompt noise: identical scores, win rate one half.
    for record in results["images"]:
        assert record["scores"] == record["baseline_scores"]
    assert clip["win_rate"] == {"win_rate": 0.5, "wins": 0, "ties": 3, "losses": 0, "prompts": 3}

    # `synthetic` is the world's true reward, read from the generated pixels against each prompt.
    assert results["rewards"]["true_reward"]["model"]["n"] == 6
    record = results["images"][0]
    with Image.open(record["image"]) as image:
        assert record["scores"]["true_reward"] == pytest.approx(true_reward(record["prompt"], image.convert("RGB")))

    # One bar with a total per long step; the libraries' loading and per-call bars stay quiet.
    bars = capsys.readouterr().err
    assert "Generating model images: 100%" in bars and "6/6" in bars and "Generating baseline images: 100%" in bars
    assert "Scoring images (tiny-clip, true_reward): 100%" in bars and "12/12" in bars
    assert "Loading pipeline components" not in bars and "Loading weights" not in bars


def test_a_lora_that_changes_images_changes_the_scores(tmp_path, tiny_sd_path, tiny_clip_path, prompt_file, capsys):
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    lora = LoraConfig(r=4, lora_alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    pipeline.unet.add_adapter(lora)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipeline.unet))
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=layers)

    prompts = tmp_path / "prompts.tsv"  # PartiPrompts' layout: a Prompt column among others
    prompts.write_text("Prompt\tCategory\n" + "".join(f"{p}\tShapes\n" for p in PROMPTS))
    _, results = evaluate_cli(
        tmp_path, tiny_sd_path, prompts, f"clip:{tiny_clip_path}", "--lora", str(tmp_path / "lora")
    )
    assert [r["prompt"] for r in results["images"][::2]] == PROMPTS
    model = np.array([r["scores"]["tiny-clip"] for r in results["images"]])
    baseline = np.array([r["baseline_scores"]["tiny-clip"] for r in results["images"]])
    assert np.abs(model - baseline).max() > 1e-4
    assert results["rewards"]["tiny-clip"]["win_rate"]["ties"] < 3
    assert results["generation"]["source"]["lora"].startswith("sha256:")  # the LoRA by its weights, not its path

    pipeline.unet.set_adapters("default")  # the LoRA retrained in place: other weights, the same path
    layers = {key: value * 2 for key, value in layers.items()}
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=layers)
    with pytest.raises(SystemExit):
        evaluate_cli(tmp_path, tiny_sd_path, prompts, f"clip:{tiny_clip_path}", "--lora", str(tmp_path / "lora"))
    assert "images generated with other settings (source differ)" in capsys.readouterr().err


def test_generation_resumes_and_refuses_other_settings(tmp_path, tiny_sd_path):
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    settings = GenerationSettings(num_inference_steps=2, num_images_per_prompt=2, batch_size=4)
    first = generate(pipeline, PROMPTS[:2], tmp_path, settings)
    os.remove(first[1].path)  # an interrupted run lost one image

    with mock.patch.object(type(pipeline), "__call__", autospec=True, side_effect=type(pipeline).__call__) as call:
        again = generate(pipeline, PROMPTS[:2] + [PROMPTS[2]], tmp_path, settings)
    assert [g.path for g in again[:4]] == [g.path for g in first]
    assert call.call_count == 1 and call.call_args.kwargs["prompt"] == [PROMPTS[0], PROMPTS[2], PROMPTS[2]]

    with pytest.raises(ValueError, match="num_inference_steps"):
        generate(pipeline, PROMPTS, tmp_path, GenerationSettings(num_inference_steps=3, num_images_per_prompt=2))
    with pytest.raises(ValueError, match="dtype"):  # half-precision images are not mixed with float32 ones
        generate(pipeline.to(dtype=torch.bfloat16), PROMPTS[:2], tmp_path, settings)


def test_same_prompt_and_seed_give_the_same_image_in_any_position(tmp_path, tiny_sd_path):
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    settings = GenerationSettings(num_inference_steps=2)
    alone = generate(pipeline, [PROMPTS[1]], tmp_path / "a", settings)[0]
    batched = generate(pipeline, PROMPTS, tmp_path / "b", settings)[1]
    assert alone.seed == batched.seed
    np.testing.assert_array_equal(np.asarray(alone.image()), np.asarray(batched.image()))


def test_bootstrap_interval_and_summary_on_hand_made_scores():
    assert bootstrap_interval([2.0] * 10) == (2.0, 2.0)
    values = np.arange(100, dtype=float)
    low, high = bootstrap_interval(values)
    half_width = 1.96 * values.std() / np.sqrt(len(values))  # the normal approximation, ~5.7
    assert low < 49.5 < high and (high - low) / 2 == pytest.approx(half_width, rel=0.1)
    summary = summarize([1.0, 2.0, 3.0, float("nan"), 10.0])
    assert (summary["mean"], summary["median"], summary["n"], summary["n_missing"]) == (4.0, 2.5, 4, 1)


def test_images_of_one_prompt_are_resampled_together():
    per_prompt = np.random.default_rng(0).normal(size=50)
    two_alike_images_each = np.repeat(per_prompt, 2)  # a prompt's images move together
    prompts = np.repeat(np.arange(50), 2)
    assert bootstrap_interval(two_alike_images_each, groups=prompts) == pytest.approx(bootstrap_interval(per_prompt))
    narrow_low, narrow_high = bootstrap_interval(two_alike_images_each)  # as if 100 independent images
    low, high = bootstrap_interval(two_alike_images_each, groups=prompts)
    assert (narrow_high - narrow_low) / (high - low) == pytest.approx(1 / np.sqrt(2), rel=0.15)


def test_win_rate_counts_ties_as_half_per_prompt():
    model = per_prompt_means([1.0, 3.0, 2.0, 2.0, 5.0, float("nan")], [0, 0, 1, 1, 2, 3])
    baseline = per_prompt_means([0.0, 2.0, 6.0, 6.0], [0, 1, 2, 3])
    assert model == {0: 2.0, 1: 2.0, 2: 5.0}  # prompt 3 has no finite score
    # prompt 0 wins, prompt 1 ties, prompt 2 loses; prompt 3 is not shared.
    assert win_rate(model, baseline) == {"win_rate": 0.5, "wins": 1, "ties": 1, "losses": 1, "prompts": 3}
    assert win_rate({0: 1.0}, {0: 0.0})["win_rate"] == 1.0


def test_partiprompts_ship_with_the_package_and_filter():
    everything = partiprompts()
    assert len(everything) == 1632
    animals = load_prompts("partiprompts", category="Animals", challenge="Basic")
    assert 0 < len(animals) < len(everything) and set(animals) <= set(everything)
    assert load_prompts("partiprompts", max_prompts=5) == list(dict.fromkeys(everything))[:5]
    with pytest.raises(ValueError, match="Unknown PartiPrompts Category"):
        partiprompts(category="Dinosaurs")


def test_prompt_files_and_hub_datasets(tmp_path, prompt_file, caplog):
    assert load_prompts(str(prompt_file)) == PROMPTS
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a"}\n{"caption": "b"}\n{"prompt": "a"}\n{"prompt": " "}\n')
    with caplog.at_level("INFO", logger="fifa_hf"):
        assert load_prompts(str(jsonl)) == ["a", "b"]
    assert "2 of 4 prompts skipped (empty, not text, or repeated)" in caplog.text  # counted, not silently lost
    for line, problem in (('["a list"]', "has no string 'prompt' or 'caption'"), ("{'prompt': 1", "is not JSON")):
        jsonl.write_text('{"prompt": "a"}\n' + line + "\n")
        with pytest.raises(ValueError, match=f"p.jsonl:2 {problem}"):
            load_prompts(str(jsonl))
    tsv = tmp_path / "p.tsv"
    tsv.write_text("id\tcaption\n1\tc\n2\td\n")
    assert load_prompts(str(tsv)) == ["c", "d"]
    tsv.write_text("id\ttext\n1\tc\n")
    with pytest.raises(ValueError, match="needs a 'Prompt', 'prompt' or 'caption' column"):
        load_prompts(str(tsv))
    with (
        mock.patch("fifa_hf.resolve.snapshot_download", return_value=str(tmp_path)) as check,
        mock.patch("datasets.load_dataset") as load,
    ):
        load.return_value.select_columns.return_value = [{"caption": "x"}, {"caption": "x"}, {"caption": "y"}]
        assert load_prompts("pickapic") == ["x", "y"]
    # The dataset is checked on the Hub (its card only) before streaming.
    check.assert_called_once()
    assert check.call_args.args == ("yuvalkirstain/pickapic_v2",) and check.call_args.kwargs["repo_type"] == "dataset"
    assert check.call_args.kwargs["allow_patterns"] == ["README.md"]
    load.assert_called_once_with("yuvalkirstain/pickapic_v2", split="test_unique", streaming=True)
    load.return_value.select_columns.assert_called_once_with(["caption"])
    with pytest.raises(ValueError, match="Unknown prompt set"):
        load_prompts("no-such-set")


def test_reward_callback_logs_beside_the_trainer_and_sends_samples_to_tensorboard(
    tmp_path, tiny_sd_path, tiny_clip_path
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pairs = make_synthetic_pickapic(8, seed=0, image_size=32, tie_fraction=0, unlabeled_fraction=0)
    args = DiffusionDPOConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=4, logging_steps=2,
        report_to="tensorboard", save_strategy="no", use_cpu=True, seed=0, learning_rate=1e-3,
    )  # fmt: skip
    trainer = DiffusionDPOTrainer(str(tiny_sd_path), args, train_dataset=pairs)
    reward = CLIPRewardModel(str(tiny_clip_path), device="cpu")  # no name given: named after the checkpoint
    callback = RewardEvaluationCallback(
        trainer, PROMPTS[:2], [reward], eval_steps=2, settings=GenerationSettings(num_inference_steps=2)
    )
    trainer.add_callback(callback)
    # Samples another model left in the same output_dir, under the names this run's samples will have.
    stale = generate(
        tiny_sd_pipeline(seed=1), PROMPTS[:2], tmp_path / "out" / "eval_samples" / "step-0", callback.settings
    )
    stale_pixels = [np.asarray(g.image()) for g in stale]
    trainer.train()

    assert [step for step, _ in callback.history] == [0, 2, 4]
    fresh = [np.asarray(Image.open(g.path).convert("RGB")) for g in stale]  # same paths, new images
    assert all(np.abs(a.astype(int) - b).max() > 0 for a, b in zip(fresh, stale_pixels))
    history = trainer.state.log_history
    logged = [(e["step"], e["eval_reward/tiny-clip"]) for e in history if "eval_reward/tiny-clip" in e]
    assert logged == [(step, means["tiny-clip"]) for step, means in callback.history]
    # The trainer's own logs survive at the evaluation steps, with its DPO metrics.
    trained = {e["step"]: e for e in history if "loss" in e}
    assert sorted(trained) == [2, 4]
    for entry in trained.values():
        assert {"grad_norm", "learning_rate", "rewards/accuracies"} <= set(entry)
    assert trainer.pipeline.unet.training  # generation put the UNet back in training mode
    assert callback.history[0][1]["tiny-clip"] != callback.history[-1][1]["tiny-clip"]  # the full UNet learned

    for step in (0, 2, 4):  # the samples are kept, one folder per evaluation
        assert len(list((tmp_path / "out" / "eval_samples" / f"step-{step}").glob("*.png"))) == 2
    (run,) = (tmp_path / "out" / "runs").iterdir()  # TensorBoard's default log dir
    events = EventAccumulator(str(run), size_guidance={"images": 0}).Reload()
    assert [e.step for e in events.Scalars("eval/reward/tiny-clip")] == [0, 2, 4]
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4]
    assert [e.step for e in events.Images("eval/samples")] == [0, 2, 4]


def test_evaluate_fails_before_any_image_naming_the_flag_and_the_id(tmp_path, tiny_sd_path, tiny_clip_path, capsys):
    output_dir = tmp_path / "eval"
    base = [
        "evaluate", "--model_name_or_path", str(tiny_sd_path), "--reward", f"clip:{tiny_clip_path}",
        "--prompts", "partiprompts", "--max_prompts", "2", "--output_dir", str(output_dir),
    ]  # fmt: skip
    culprits = {  # with HF_HUB_OFFLINE=1 (as in conftest) an uncached Hub id cannot be fetched
        ("--model_name_or_path", "someone/no-such-pipeline"): "--model_name_or_path: the Hub model 'someone/no-such-pipeline'",
        ("--baseline_model_name_or_path", "./no/such/pipeline"): "--baseline_model_name_or_path: the local path './no/such/pipeline' does not exist",
        ("--lora", "someone/no-such-lora"): "--lora: the Hub model 'someone/no-such-lora'",
        ("--reward", "clip:someone/no-such-clip"): "--reward: the Hub model 'someone/no-such-clip'",
        ("--prompts", "someone/no-such-prompts@test:caption"): "--prompts: the Hub dataset 'someone/no-such-prompts'",
        ("--prompts", "my_prompts.tsv"): "--prompts: the local path 'my_prompts.tsv' does not exist",
        ("--dtype", "auto"): "--dtype must be one of float32, float16, bfloat16, got 'auto'",
    }  # fmt: skip
    with mock.patch("fifa_hf.evaluation.evaluate.load_for_evaluation") as load:
        for flag_and_value, culprit in culprits.items():
            with pytest.raises(SystemExit) as exit_:
                main([*base, *flag_and_value])
            assert exit_.value.code == 2 and culprit in capsys.readouterr().err
    load.assert_not_called()
    assert not (output_dir / "images").exists()


@pytest.mark.parametrize("pipeline", ["tiny_sd_path", "tiny_sdxl_path"])
def test_pipeline_download_patterns_fetch_what_loads_and_skip_the_rest(tmp_path, pipeline, request):
    repo = tmp_path / "repo"
    shutil.copytree(request.getfixturevalue(pipeline), repo)
    decoys = [  # what SD1.5 and SDXL repos also hold: single-file checkpoints, variants, .bin copies
        "v1-5-pruned.ckpt", "sd_xl_base_1.0.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.non_ema.safetensors", "unet/diffusion_pytorch_model.bin",
        "text_encoder/pytorch_model.bin", "safety_checker/model.safetensors", "vae_1_0/diffusion_pytorch_model.safetensors",
    ]  # fmt: skip
    for decoy in decoys:
        (repo / decoy).parent.mkdir(exist_ok=True)
        (repo / decoy).write_bytes(b"not loaded")
    (repo / "feature_extractor").mkdir(exist_ok=True)  # SD1.5's image processor config: small, listed in model_index
    (repo / "feature_extractor" / "preprocessor_config.json").write_text("{}")
    files = [path.relative_to(repo).as_posix() for path in repo.rglob("*") if path.is_file()]
    fetched = set(filter_repo_objects(files, allow_patterns=DIFFUSERS_PIPELINE_FILES))
    assert fetched == set(files) - set(decoys)
    download = tmp_path / "download"
    for name in fetched:
        (download / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(repo / name, download / name)
    assert load_for_evaluation(str(download), None, "cpu", "float32").unet is not None


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A stand-in for the Hub's file server: repos are local folders, and a snapshot copies the files that
    match ``allow_patterns`` (as the real one downloads only those). Returns the repos root and the calls."""
    repos, calls = tmp_path / "hub", []

    def snapshot_download(repo_id, repo_type="model", revision=None, allow_patterns=None, etag_timeout=None):
        calls.append((repo_id, allow_patterns))
        source, target = repos / repo_id, tmp_path / "cache" / repo_id
        files = [p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file()]
        for name in filter_repo_objects(files, allow_patterns=allow_patterns):
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source / name, target / name)
        target.mkdir(parents=True, exist_ok=True)
        return str(target)

    monkeypatch.setattr("fifa_hf.resolve.snapshot_download", snapshot_download)
    return repos, calls


def test_a_clip_reward_resolves_to_the_files_it_loads(fake_hub, tiny_clip_path):
    repos, calls = fake_hub
    shutil.copytree(tiny_clip_path, repos / "someone" / "clip")
    (repos / "someone" / "clip" / "pytorch_model.bin").write_bytes(b"the same weights again")
    reward = CLIPRewardModel("someone/clip", device="cpu")
    reward.resolve("--reward")
    assert reward.name == "clip" and [repo for repo, _ in calls] == ["someone/clip", "someone/clip"]
    fetched = {p.name for p in Path(reward.model_name_or_path).iterdir()}
    assert "model.safetensors" in fetched and "pytorch_model.bin" not in fetched
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    local = CLIPRewardModel(str(tiny_clip_path), device="cpu")
    assert reward.score(["a red square"], [image]) == pytest.approx(local.score(["a red square"], [image]))


def test_a_clip_reward_without_safetensors_resolves_its_pytorch_weights(fake_hub, tiny_clip_path):
    from transformers import CLIPModel

    repos, calls = fake_hub
    shutil.copytree(tiny_clip_path, repos / "someone" / "old-clip")
    (repos / "someone" / "old-clip" / "model.safetensors").unlink()  # an older repo: pickled weights only
    torch.save(
        CLIPModel.from_pretrained(tiny_clip_path).state_dict(), repos / "someone" / "old-clip" / "pytorch_model.bin"
    )
    reward = CLIPRewardModel("someone/old-clip", device="cpu")
    reward.resolve("--reward")
    assert "pytorch_model.bin" in {p.name for p in Path(reward.model_name_or_path).iterdir()}
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    local = CLIPRewardModel(str(tiny_clip_path), device="cpu")
    assert reward.score(["a red square"], [image]) == pytest.approx(local.score(["a red square"], [image]))


def test_open_clip_weights_resolve_to_safetensors_when_the_repo_has_them(fake_hub):
    from fifa_hf.scoring.rewards import _resolve_open_clip_weights

    repos, calls = fake_hub
    for repo, weights in (("laion/both", ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]),
                          ("laion/bin-only", ["open_clip_pytorch_model.bin"])):  # fmt: skip
        (repos / repo).mkdir(parents=True)
        for name in ["open_clip_config.json", *weights]:
            (repos / repo / name).write_text(name)
    both = Path(_resolve_open_clip_weights("laion/both", "open_clip_pytorch_model.bin", "--reward"))
    assert sorted(p.name for p in both.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    bin_only = Path(_resolve_open_clip_weights("laion/bin-only", "open_clip_pytorch_model.bin", "--reward"))
    assert sorted(p.name for p in bin_only.iterdir()) == ["open_clip_config.json", "open_clip_pytorch_model.bin"]
    assert [repo for repo, _ in calls] == ["laion/both", "laion/bin-only", "laion/bin-only"]


def test_the_pickscore_spec_resolves_the_model_and_its_processor(fake_hub, tiny_clip_path):
    repos, calls = fake_hub
    for repo in ("yuvalkirstain/PickScore_v1", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"):
        shutil.copytree(tiny_clip_path, repos / repo)
    (repos / "laion/CLIP-ViT-H-14-laion2B-s32B-b79K" / "open_clip_pytorch_model.bin").write_bytes(b"not read")
    reward = load_reward_model("pickscore", device="cpu")
    reward.resolve("--reward")
    assert reward.name == "pickscore"
    assert [repo for repo, _ in calls] == ["yuvalkirstain/PickScore_v1", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"]
    processor_files = {p.name for p in Path(reward.processor_name_or_path).iterdir()}
    assert "processor_config.json" in processor_files and not processor_files & {
        "model.safetensors",
        "open_clip_pytorch_model.bin",
    }
    assert reward.score(["a red square"], [Image.new("RGB", (32, 32), "red")]).shape == (1,)
