import json
import os
from unittest import mock

import numpy as np
import pytest
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image

from fifa_hf.cli import main
from fifa_hf.evaluation import (
    GenerationSettings,
    RewardEvaluationCallback,
    bootstrap_interval,
    generate,
    load_prompts,
    partiprompts,
    per_prompt_means,
    summarize,
    win_rate,
)
from fifa_hf.scoring import CLIPRewardModel
from fifa_hf.trainer import DiffusionDPOConfig, DiffusionDPOTrainer
from fifa_hf.world.synthetic import make_synthetic_pickapic

PROMPTS = ["a red circle", "two blue squares", "a green triangle on a black background"]


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n\n" + PROMPTS[0] + "\n")  # a blank line and a duplicate
    return path


def evaluate_cli(tmp_path, tiny_sd_path, tiny_clip_path, prompt_file, *extra):
    output_dir = tmp_path / "eval"
    main([
        "evaluate", "--model", str(tiny_sd_path), "--baseline", str(tiny_sd_path), "--prompts", str(prompt_file),
        "--reward", f"clip:{tiny_clip_path}", "--num_images_per_prompt", "2", "--num_inference_steps", "2",
        "--guidance_scale", "3.0", "--output_dir", str(output_dir), *extra,
    ])  # fmt: skip
    return output_dir, json.loads((output_dir / "results.json").read_text())


def test_evaluate_writes_images_results_table_and_grid(tmp_path, tiny_sd_path, tiny_clip_path, prompt_file):
    output_dir, results = evaluate_cli(tmp_path, tiny_sd_path, tiny_clip_path, prompt_file)
    assert results["num_prompts"] == 3
    assert len(list((output_dir / "images" / "model").glob("*.png"))) == 6
    assert len(list((output_dir / "images" / "baseline").glob("*.png"))) == 6
    generation = results["generation"]
    assert generation["scheduler"] == "DDPMScheduler"
    assert (generation["num_inference_steps"], generation["guidance_scale"]) == (2, 3.0)
    clip = results["rewards"]["clip"]
    assert clip["model"]["n"] == 6 and clip["model"]["ci_low"] <= clip["model"]["mean"] <= clip["model"]["ci_high"]
    table = (output_dir / "results.md").read_text()
    assert "| clip |" in table and "win rate" in table and "DDPMScheduler, 2 steps, guidance 3.0" in table
    with Image.open(output_dir / "grid.png") as grid:
        assert grid.width == 2 * 128  # model beside baseline

    # The baseline is the same model with the same per-prompt noise: identical scores, win rate one half.
    for record in results["images"]:
        assert record["scores"] == record["baseline_scores"]
    assert clip["win_rate"] == {"win_rate": 0.5, "wins": 0, "ties": 3, "losses": 0, "prompts": 3}


def test_a_lora_that_changes_images_changes_the_scores(tmp_path, tiny_sd_path, tiny_clip_path, prompt_file):
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    lora = LoraConfig(r=4, lora_alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    pipeline.unet.add_adapter(lora)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipeline.unet))
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=layers)

    _, results = evaluate_cli(tmp_path, tiny_sd_path, tiny_clip_path, prompt_file, "--lora", str(tmp_path / "lora"))
    model = np.array([r["scores"]["clip"] for r in results["images"]])
    baseline = np.array([r["baseline_scores"]["clip"] for r in results["images"]])
    assert np.abs(model - baseline).max() > 1e-4
    assert results["rewards"]["clip"]["win_rate"]["ties"] < 3


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


def test_prompt_files_and_hub_datasets(tmp_path, prompt_file):
    assert load_prompts(str(prompt_file)) == PROMPTS
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a"}\n{"caption": "b"}\n')
    assert load_prompts(str(jsonl)) == ["a", "b"]
    with mock.patch("datasets.load_dataset") as load:
        load.return_value.select_columns.return_value = [{"caption": "x"}, {"caption": "x"}, {"caption": "y"}]
        assert load_prompts("pickapic") == ["x", "y"]
    load.assert_called_once_with("yuvalkirstain/pickapic_v2", split="test_unique", streaming=True)
    load.return_value.select_columns.assert_called_once_with(["caption"])
    with pytest.raises(ValueError, match="Unknown prompt set"):
        load_prompts("no-such-set")


def test_reward_callback_logs_at_the_right_steps(tmp_path, tiny_sd_path, tiny_clip_path):
    pairs = make_synthetic_pickapic(8, seed=0, image_size=32, tie_fraction=0, unlabeled_fraction=0)
    args = DiffusionDPOConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=5, logging_steps=1,
        report_to="none", save_strategy="no", use_cpu=True, seed=0, learning_rate=1e-3,
    )  # fmt: skip
    trainer = DiffusionDPOTrainer(str(tiny_sd_path), args, train_dataset=pairs)
    reward = CLIPRewardModel(str(tiny_clip_path), device="cpu", name="clip")
    callback = RewardEvaluationCallback(
        trainer, PROMPTS[:2], [reward], eval_steps=2, settings=GenerationSettings(num_inference_steps=2)
    )
    trainer.add_callback(callback)
    trainer.train()
    assert [step for step, _ in callback.history] == [0, 2, 4]
    logged = [(e["step"], e["eval/reward/clip"]) for e in trainer.state.log_history if "eval/reward/clip" in e]
    assert logged == [(step, means["clip"]) for step, means in callback.history]
    assert trainer.pipeline.unet.training  # generation put the UNet back in training mode
    assert callback.history[0][1]["clip"] != callback.history[-1][1]["clip"]  # the full UNet learned
