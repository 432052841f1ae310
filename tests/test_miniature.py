import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from fifa_hf.world.miniature import (
    MiniatureArguments,
    RunSpec,
    TrainingSettings,
    choose_settings,
    evaluation_prompts,
    prepare_world,
    run_all,
    run_stage0,
    sweep_specs,
    world_rows,
)
from fifa_hf.world.miniature_report import (
    blocked_interval,
    minimum_detectable_difference,
    pairs_seen,
    write_report,
)
from fifa_hf.world.reference_reading import ATTRIBUTES, reference_read
from fifa_hf.world.synthetic import JUNK_WORDS, UNSAFE_SUFFIXES, Attributes, describe, parse_prompt, render
from fifa_hf.world.true_reward import read_attributes
from fifa_hf.world.world_model import (
    IMAGE_SIZE,
    pretraining_set,
    shipped_world_model,
    world_tokenizer,
)


def test_the_checker_reads_back_what_was_rendered():
    rng = np.random.default_rng(0)
    for i in range(200):
        target = Attributes.random(rng)
        shown = read_attributes(render(target, IMAGE_SIZE, rng))
        assert shown == {name: getattr(target, name) for name in shown}
        assert parse_prompt(describe(target, i % 3)) == target


def test_the_reference_reading_recovers_jittered_renders_and_the_harm_marker():
    rng = np.random.default_rng(1)
    for _ in range(40):
        target, harm = Attributes.random(rng), bool(rng.random() < 0.5)
        read = reference_read(render(target, IMAGE_SIZE, rng, harm=harm))
        assert read == {**{name: getattr(target, name) for name in read if name != "harm"}, "harm": harm}


def test_the_world_tokenizer_has_one_token_per_world_word():
    tokenizer = world_tokenizer()
    words = ["triangles", "background", "outlined", *" ".join(UNSAFE_SUFFIXES).replace(",", "").split()]
    words += [w for w in JUNK_WORDS if w.isalpha()]
    for word in words:
        assert len(tokenizer(word).input_ids) == 3, word  # start, the word, end


def test_pretraining_data_follows_the_worlds_prompt_mix_and_harm_rate():
    from PIL import Image

    from fifa_hf.world.true_reward import shows_harm

    prompts, images = pretraining_set(3000, seed=0)
    unsafe = np.array([any(s in p for s in UNSAFE_SUFFIXES) for p in prompts])
    junk = np.array([parse_prompt(p) is None for p in prompts])
    harm = np.array([shows_harm(Image.fromarray(image)) for image in images])
    assert 0.03 < unsafe.mean() < 0.07 and 0.07 < junk.mean() < 0.13
    assert 0.3 < harm[unsafe].mean() < 0.7 and not harm[~unsafe].any()  # 0.5, about 150 unsafe prompts


def test_pretraining_captions_can_describe_their_renders_with_the_same_draws():
    from PIL import Image

    def described(prompts, images):
        """Share of grammar captions that name exactly what the pixel reader reads in their render."""
        pairs = [(parse_prompt(p), read_attributes(Image.fromarray(i))) for p, i in zip(prompts, images)]
        return np.mean([Attributes(**{k: shown[k] for k in ATTRIBUTES}) == asked for asked, shown in pairs if asked])

    prompts, images = pretraining_set(300, seed=1)
    captions, same_images = pretraining_set(300, seed=1, describe_renders=True)
    assert np.array_equal(images, same_images)  # the same renders, only the captions change
    assert [p for p in prompts if parse_prompt(p) is None] == [c for c in captions if parse_prompt(c) is None]
    assert described(captions, same_images) > 0.95 > 0.5 > described(prompts, images)


def test_held_out_prompts_never_repeat_a_training_combination_and_splits_do_not_overlap():
    args = MiniatureArguments(num_pairs=300, eval_clean_prompts=30, eval_unsafe_prompts=10)
    rows = world_rows(0, args.num_pairs, args.label_temperature)
    seen = {parse_prompt(c) for c in rows["caption"]}
    test = evaluation_prompts(rows, "test", 0, args)
    validation = evaluation_prompts(rows, "validation", 0, args)
    assert [kind for _, kind, _ in test].count("unsafe") == 10 and len(test) == 40
    assert not {target for _, _, target in test} & seen
    assert not {target for _, _, target in test} & {target for _, _, target in validation}


def test_blocked_interval_averages_training_seeds_within_a_world_first():
    values = {(0, 0): 0.1, (0, 1): 0.3, (1, 0): 0.4, (1, 1): 0.4, (2, 0): 0.6, (2, 1): 0.8}
    interval = blocked_interval(values)
    world_means = np.array([0.2, 0.4, 0.7])
    half = 4.302652729911275 * world_means.std(ddof=1) / np.sqrt(3)  # t(0.975, df = 2)
    assert interval["worlds"] == 3 and interval["mean"] == pytest.approx(world_means.mean())
    assert interval["ci_high"] - interval["mean"] == pytest.approx(half)
    detectable = (4.302652729911275 + 1.0606601717798212) * interval["sd"] / np.sqrt(3)  # + t(0.8, df = 2)
    assert minimum_detectable_difference(interval["sd"], 3) == pytest.approx(detectable)


def test_pairs_seen_count_the_short_last_update_of_each_pass():
    """280 pairs in updates of 64: 64, 64, 64, 64 and 24 a pass (transformers steps at the end of a pass)."""
    assert [pairs_seen(updates, 280, 64) for updates in (1, 4, 5, 6, 10)] == [64, 256, 280, 344, 560]
    assert pairs_seen(300, 280, 64) == 60 * 280  # not 300 x 64 = 19,200
    assert pairs_seen(3, 128, 64) == 192  # a subset that fills its updates


def test_the_sweep_rule_keeps_each_settings_loss_and_drops_the_ones_that_drift():
    args = MiniatureArguments(
        sweep_grid=((0, 1e-4, 500.0, None, "sigmoid"), (0, 1e-4, 500.0, 250.0, "sigmoid"), (0, 3e-4, 500.0, None, "apo_zero")),
        sweep_steps=(3, 6), evaluations=3,
    )  # fmt: skip
    specs = sweep_specs(args)
    assert [spec.eval_steps for spec in specs] == [(1, 2, 3, 4, 5, 6)] * 3
    assert [(spec.settings.rpo_alpha, spec.settings.loss_type) for spec in specs] == [
        (None, "sigmoid"), (250.0, "sigmoid"), (None, "apo_zero")
    ]  # fmt: skip
    assert specs[2].name == "full-w200-s0-r0-lr0.0003-b500-apo_zero-n6"

    def run(spec, rewards, drift):  # what a finished sweep run records: its curve and drift on chosen images
        curve = [{"step": step, "true_reward": reward} for step, reward in zip(spec.eval_steps, rewards)]
        drift = [{"step": step, "chosen": drift, "ref_chosen": 1.0} for step in spec.eval_steps]
        return {"spec": dataclasses.asdict(spec), "curve": curve, "drift": drift}

    plain, rpo, faster = specs
    results = [
        run(plain, [0.5, 0.6, 0.7, 0.8, 0.9, 0.95], drift=0.05),  # the best rewards, but drifting: not eligible
        run(rpo, [0.5, 0.5, 0.5, 0.6, 0.6, 0.6], drift=0.0),
        run(faster, [0.55, 0.55, 0.55, 0.5, 0.5, 0.5], drift=0.005),
    ]
    chosen, table = choose_settings(results, args)
    assert chosen == TrainingSettings(1e-4, 500.0, 0, 6, rpo_alpha=250.0)
    assert len(table) == 6 and {row["settings"]["loss_type"] for row in table} == {"sigmoid", "apo_zero"}
    results[2] = run(faster, [0.5, 0.5, 0.5, 0.7, 0.7, 0.7], drift=0.005)
    assert choose_settings(results, args)[0] == TrainingSettings(3e-4, 500.0, 0, 6, loss_type="apo_zero")


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Two runs of one block (base, shuffled oracle) of the shipped world model, on a tiny budget."""
    root = tmp_path_factory.mktemp("miniature")
    args = MiniatureArguments(
        num_pairs=120, batch_size=2, eval_clean_prompts=2, eval_unsafe_prompts=1, sampling_steps=1,
        reader_check_images=2, world_seeds=(7,), training_seeds=(0,), arms=("base", "shuffled_oracle"),
        output_dir=str(root / "out"),
    )  # fmt: skip
    settings = TrainingSettings(
        learning_rate=1e-4, beta=2500.0, lora_rank=0, train_steps=2, rpo_alpha=1250.0, loss_type="apo_zero"
    )
    specs = [
        RunSpec("main", "base", 7, 0, "test", None, (0,), samples=True),
        RunSpec("main", "shuffled_oracle", 7, 0, "test", settings, (1, 2), samples=True),
    ]
    return args, specs, run_all(specs, args, "tiny")


def test_every_run_writes_its_curve_drift_and_reader_check(tiny_runs):
    args, specs, results = tiny_runs
    base, shuffled = results
    assert [entry["step"] for entry in base["curve"]] == [0]
    assert [entry["step"] for entry in shuffled["curve"]] == [1, 2]
    assert shuffled["train_pairs"] == 12  # K = 10% of the usable pairs
    trained_with = shuffled["trainer_args"]  # the run's settings and the design's update size reach the trainer
    assert trained_with["rpo_alpha"] == 1250.0 and trained_with["beta"] == 2500.0
    assert trained_with["loss_type"] == "apo_zero"
    assert trained_with["bf16"] is False  # trains in fp32 (faster on CPU); samples under bf16 autocast
    assert trained_with["per_device_train_batch_size"] * trained_with["gradient_accumulation_steps"] == 8
    assert shuffled["drift"] and shuffled["reader_agreement"]["n"] == 2
    assert (Path(args.output_dir) / "samples" / "main" / "shuffled_oracle-w7-s0.png").exists()
    for result in results:
        assert set(result["curve"][-1]) >= {"true_reward", "attributes", "harm_rate", "truth"}


def test_the_shuffled_oracle_keeps_the_oracles_pairs_with_half_the_labels_swapped(tiny_runs):
    args, _, _ = tiny_runs
    world = prepare_world(7, ("oracle", "shuffled_oracle"), args, Path(args.output_dir))
    assert world["subsets"]["oracle"] == world["subsets"]["shuffled_oracle"]
    assert sum(world["swapped"]) == len(world["swapped"]) // 2
    composition = world["composition"]
    assert composition["oracle"]["agreement"] == 1.0 and composition["oracle"]["true_gap"] > 0.5
    assert abs(composition["shuffled_oracle"]["true_gap"]) < composition["oracle"]["true_gap"] / 2


def test_a_rerun_skips_finished_runs_and_redoes_missing_and_stale_ones(tiny_runs):
    args, specs, results = tiny_runs
    runs = Path(args.output_dir) / "runs" / "main"
    base, trained = runs / "base-w7-s0.json", runs / "shuffled_oracle-w7-s0.json"
    before = {f.name: f.stat().st_mtime_ns for f in runs.glob("*.json")}
    base.unlink()
    again = run_all(specs, args, "tiny")
    assert trained.stat().st_mtime_ns == before[trained.name]  # finished: skipped
    assert base.stat().st_mtime_ns != before[base.name] and again[0]["curve"] == results[0]["curve"]
    stale = json.loads(base.read_text())
    stale["fingerprint"] = "changed inputs"
    base.write_text(json.dumps(stale))
    run_all(specs, args, "tiny")
    assert json.loads(base.read_text())["fingerprint"] == results[0]["fingerprint"]
    redone = base.stat().st_mtime_ns
    run_all(specs[:1], args, "tiny")  # a call that asks for fewer arms (stage 0's base model first)
    assert base.stat().st_mtime_ns == redone  # the finished base run is still finished


def test_a_base_run_stays_finished_when_a_later_call_asks_for_more_arms(tiny_runs, tmp_path):
    args, specs, _ = tiny_runs
    args = dataclasses.replace(args, output_dir=str(tmp_path))
    base = tmp_path / "runs" / "main" / "base-w7-s0.json"
    run_all(specs[:1], args, "stage 0's base model first")
    finished = base.stat().st_mtime_ns
    run_all(specs, args, "then the trained arms of the same block")
    assert base.stat().st_mtime_ns == finished


def test_the_report_writes_results_json_in_the_published_shape(tiny_runs):
    args, _, results = tiny_runs
    gate = {"value": 0.5, "threshold": 0.45, "passed": True, "rule": "r"}
    stage0 = {"settings": {"learning_rate": 1e-4, "beta": 2500.0, "lora_rank": 4, "train_steps": 3}, "sweep": [],
              "gates": {"base_true_reward": gate}}  # fmt: skip
    written = write_report(Path(args.output_dir), args, stage0, results, 1.0, ["p"] * 8)
    saved = json.loads((Path(args.output_dir) / "results.json").read_text())
    assert saved["gates"] == {"base_true_reward": gate}
    for arm in args.arms:
        entry = saved["arms"][arm]
        assert entry["runs"] == 1 and isinstance(entry["harm_rate"], float)
        assert set(entry["final"]) >= {"mean", "ci_low", "ci_high"} and set(entry["vs_random"]) >= {"mean", "ci_low"}
    endpoint = np.mean([e["true_reward"] for e in results[1]["curve"]])  # the last (here: all) evaluations
    assert written["arms"]["shuffled_oracle"]["final"]["mean"] == pytest.approx(endpoint)
    report = (Path(args.output_dir) / "report.md").read_text()
    assert "| shuffled_oracle | 1 |" in report and str(args.output_dir) not in report


def test_a_stage1_stopped_before_its_end_leaves_a_report_of_stage0_that_compares_no_arm(tmp_path, monkeypatch):
    from fifa_hf.world import miniature

    args = MiniatureArguments(
        num_pairs=120, eval_clean_prompts=2, eval_unsafe_prompts=1, world_seeds=(7,), control_world_seeds=(8,),
        training_seeds=(0,), arms=("base", "full", "oracle"), output_dir=str(tmp_path),
    )  # fmt: skip
    gate = {"value": 0.5, "threshold": 0.45, "passed": True, "rule": "r"}
    stage0 = {"settings": dataclasses.asdict(args.settings), "sweep": [], "gates": {"base_true_reward": gate}}
    monkeypatch.setattr(miniature, "run_stage0", lambda _: stage0)  # every gate passed

    def stopped(specs, *_):  # the session ends during stage 1
        raise KeyboardInterrupt

    monkeypatch.setattr(miniature, "run_all", stopped)
    with pytest.raises(KeyboardInterrupt):
        miniature.run_experiment(args)
    report = (tmp_path / "report.md").read_text()
    assert "Stage 1 is not finished: 0 of 3 runs have finished" in report and "Stage 1 did not run" not in report
    results = json.loads((tmp_path / "results.json").read_text(), parse_constant=not_json)
    assert results["arms"] == {} and "not finished (0 of 3 runs)" in results["headline"]
    assert results["minimum_detectable_difference"] is None  # undefined before any arm is compared: null, not NaN


def not_json(constant: str):
    raise ValueError(f"{constant} is not JSON")


def test_stage0_stops_at_a_base_model_that_fails_its_gate_and_trains_nothing(tmp_path):
    args = MiniatureArguments(
        num_pairs=120, batch_size=2, eval_clean_prompts=2, eval_unsafe_prompts=1, sampling_steps=1,
        reader_check_images=2, control_world_seeds=(7,), training_seeds=(0,), output_dir=str(tmp_path),
    )  # fmt: skip
    stage0 = run_stage0(args)  # one sampling step cannot draw what a prompt asks for
    assert not stage0["gates"]["base_true_reward"]["passed"] and "base_true_reward" in stage0["stopped"]
    assert set(stage0["gates"]) >= {"base_true_reward", "base_harm_rate", "reader_count"}
    assert "positive_control" not in stage0["gates"] and stage0["sweep"] == []
    assert [f.name for f in (tmp_path / "runs").rglob("*.json")] == ["base-w7-s0.json"]
    assert json.loads((tmp_path / "stage0.json").read_text())["stopped"] == stage0["stopped"]


def test_the_shipped_world_model_loads_as_a_stable_diffusion_pipeline():
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(shipped_world_model())
    assert pipeline.unet.config.sample_size * pipeline.vae_scale_factor == IMAGE_SIZE
    assert sum(p.numel() for p in pipeline.unet.parameters()) < 2_000_000


def test_the_pretraining_script_continues_the_shipped_world_model(tmp_path):
    import torch
    from diffusers import StableDiffusionPipeline

    from fifa_hf.world.world_model import main as pretrain_world_model

    shipped = shipped_world_model()
    pretrain_world_model([
        "--init_from", str(shipped), "--output_dir", str(tmp_path), "--num_images", "32", "--vae_steps", "0",
        "--unet_steps", "2", "--batch_size", "8", "--device", "cpu",
    ])  # fmt: skip
    log = json.loads((tmp_path / "pretraining.json").read_text())
    assert log["unet_steps_taken"] == 2 and log["init_from"] == str(shipped)
    before, after = (StableDiffusionPipeline.from_pretrained(path) for path in (shipped, tmp_path))
    for name, weight in before.vae.state_dict().items():  # --vae_steps 0 keeps the VAE it continues from
        assert torch.equal(weight, after.vae.state_dict()[name]), name
    moved = [
        name
        for name, weight in before.unet.state_dict().items()
        if not torch.equal(weight, after.unet.state_dict()[name])
    ]
    assert moved  # the UNet trained


def test_the_pretraining_script_can_continue_with_a_fresh_text_encoder(tmp_path):
    import torch
    from transformers import CLIPTextModel

    from fifa_hf.world.world_model import build_world_pipeline
    from fifa_hf.world.world_model import main as pretrain_world_model

    shipped = shipped_world_model()
    pretrain_world_model([
        "--init_from", str(shipped), "--fresh_text_encoder", "--seed", "7", "--output_dir", str(tmp_path),
        "--num_images", "32", "--vae_steps", "0", "--unet_steps", "1", "--batch_size", "8", "--device", "cpu",
    ])  # fmt: skip
    saved = CLIPTextModel.from_pretrained(tmp_path, subfolder="text_encoder").state_dict()
    drawn = build_world_pipeline(7).text_encoder.state_dict()
    earlier = CLIPTextModel.from_pretrained(shipped, subfolder="text_encoder").state_dict()
    assert all(torch.equal(weight, drawn[name]) for name, weight in saved.items())  # frozen while the UNet trains
    assert not torch.equal(saved["embeddings.token_embedding.weight"],
                           earlier["embeddings.token_embedding.weight"])  # fmt: skip
