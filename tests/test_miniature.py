import json

import numpy as np
import pytest
import torch

from fifa_hf.world.miniature import MiniatureArguments, build_subsets, run_experiment, train_arm
from fifa_hf.world.synthetic import Attributes, describe, make_synthetic_pickapic, parse_prompt, perturb, render
from fifa_hf.world.true_reward import SyntheticTrueReward, read_attributes, true_reward
from fifa_hf.world.world_model import IMAGE_SIZE, build_world_pipeline, shipped_world_model


def test_the_checker_reads_back_what_was_rendered():
    rng = np.random.default_rng(0)
    for i in range(200):
        target = Attributes.random(rng)
        shown = read_attributes(render(target, IMAGE_SIZE, rng))
        assert shown == {name: getattr(target, name) for name in shown}
        assert parse_prompt(describe(target, i % 3)) == target


def test_true_reward_is_high_for_matching_renders_and_low_for_mismatched_ones():
    rng = np.random.default_rng(1)
    targets = [Attributes.random(rng) for _ in range(100)]
    prompts = [describe(t) for t in targets]
    matching = [render(t, IMAGE_SIZE, rng) for t in targets]
    mismatched = [render(perturb(t, 0.0, rng), IMAGE_SIZE, rng) for t in targets]  # every attribute changed
    reward = SyntheticTrueReward()
    assert reward.score(prompts, matching).mean() == 1.0
    assert reward.score(prompts, mismatched).mean() == 0.0
    half = [render(perturb(t, 0.5, rng), IMAGE_SIZE, rng) for t in targets]
    assert 0.3 < reward.score(prompts, half).mean() < 0.7
    assert np.isnan(true_reward("asdf lol", matching[0]))


@pytest.fixture(scope="module")
def untrained_world(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "world"
    build_world_pipeline(seed=0).save_pretrained(path)
    return str(path)


def small(tmp_path, model, **overrides):
    values = dict(
        num_pairs=120, train_steps=2, batch_size=2, eval_steps=1, eval_prompts=4, sampling_steps=2, seeds=(0,),
        model=model, output_dir=str(tmp_path / "miniature"),
    )  # fmt: skip
    values.update(overrides)
    return MiniatureArguments(**values)


def test_experiment_on_a_tiny_budget_writes_every_file_and_a_well_formed_report(tmp_path, untrained_world):
    results = run_experiment(small(tmp_path, untrained_world))
    output_dir = tmp_path / "miniature"
    for name in ("results.json", "report.md", "reward_curve.png", "samples.png"):
        assert (output_dir / name).stat().st_size > 0
    assert json.loads((output_dir / "results.json").read_text())["summary"] == results["summary"]
    summary = results["summary"]
    assert set(summary) == {"fifa", "full", "random", "qsd"}
    for entry in summary.values():
        assert entry["steps"] == [0, 1, 2] and all(0.0 <= v <= 1.0 for v in entry["mean"])
        assert entry["images_seen"] == 2 * 2 * 2
    sizes = results["subset_sizes"]
    assert sizes["fifa"] == sizes["random"] == sizes["qsd"] < sizes["full"] == 120
    report = (output_dir / "report.md").read_text()
    assert "| fifa |" in report and "![reward vs step](reward_curve.png)" in report
    assert "first step reaching full's final" in report


def test_seeds_make_runs_reproducible(tmp_path, untrained_world):
    args = small(tmp_path, untrained_world, train_steps=3, eval_steps=3)
    rows = make_synthetic_pickapic(args.num_pairs, seed=0, image_size=IMAGE_SIZE, image_format="PNG")
    data = build_subsets(rows, args, tmp_path)["fifa"]
    prompts = [describe(Attributes.random(np.random.default_rng(i))) for i in range(3)]
    first, first_pipeline = train_arm("fifa", data, 0, prompts, args, untrained_world)
    again, again_pipeline = train_arm("fifa", data, 0, prompts, args, untrained_world)
    _, other_pipeline = train_arm("fifa", data, 1, prompts, args, untrained_world)
    assert first["curve"] == again["curve"]

    def weights(pipeline):
        return torch.cat([p.detach().flatten() for p in pipeline.unet.parameters()])

    assert torch.equal(weights(first_pipeline), weights(again_pipeline))
    assert not torch.equal(weights(first_pipeline), weights(other_pipeline))


def test_the_shipped_world_model_loads_as_a_stable_diffusion_pipeline():
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(shipped_world_model())
    assert pipeline.unet.config.sample_size * pipeline.vae_scale_factor == IMAGE_SIZE
    assert sum(p.numel() for p in pipeline.unet.parameters()) < 2_000_000
