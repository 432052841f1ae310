import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from huggingface_hub import ModelCard
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from transformers import TrainerCallback

from fifa_hf.trainer import DiffusionDPOConfig, DiffusionDPOTrainer, diffusion_dpo_loss
from fifa_hf.world.synthetic import make_synthetic_pickapic

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
LORA = dict(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights="gaussian")


@pytest.fixture(scope="module")
def pairs():
    return make_synthetic_pickapic(
        16, seed=0, image_size=48, tie_fraction=0, unlabeled_fraction=0, identical_fraction=0
    )


def config(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=2, logging_steps=1,
        report_to="none", save_strategy="no", use_cpu=True, seed=0, dataloader_num_workers=0, card_sample_steps=0,
    )  # fmt: skip
    values.update(overrides)
    return DiffusionDPOConfig(**values)


def losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def with_scheduler(source, target, **changes):
    """A copy of a tiny pipeline directory whose scheduler config differs."""
    shutil.copytree(source, target)
    path = target / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return target


# The other combinations run elsewhere: SDXL LoRA fp32 in test_sdxl_trains_..., and the recipes (tests/test_recipes.py)
# run SD LoRA, SD full and SDXL full in bf16, each checked to start at ln 2.
@pytest.mark.parametrize(
    "model, lora, bf16",
    [("tiny_sd_path", True, False), ("tiny_sd_path", False, False), ("tiny_sdxl_path", False, False),
     ("tiny_sdxl_path", True, True)],
    ids=["sd-lora-fp32", "sd-full-fp32", "sdxl-full-fp32", "sdxl-lora-bf16"],
)  # fmt: skip
def test_initial_loss_is_log2_with_accuracy_zero(pairs, tmp_path, request, model, lora, bf16):
    """At step 0 the policy is the reference, in fp32 and under bf16 autocast alike (the reference runs under the
    policy's autocast), so the loss is ln 2, the margins 0, and ties count as wrong (TRL's accuracy)."""
    trainer = DiffusionDPOTrainer(
        str(request.getfixturevalue(model)),
        config(tmp_path, max_steps=1, bf16=bf16, resolution=32),
        train_dataset=pairs.select(range(4)),
        peft_config=LoraConfig(**LORA) if lora else None,
    )
    trainer.train()
    first = trainer.state.log_history[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/accuracies"] == 0.0 and first["rewards/margins"] == 0.0
    assert first["mse/policy_chosen"] == first["mse/ref_chosen"]
    expected = {"rewards/chosen", "rewards/rejected", "mse/policy_rejected", "mse/ref_rejected"}
    assert expected <= set(first)


def fixed_batch(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer._batch_from_pixels(batch)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_matches_an_independent_computation_and_swapping_negates_margins(
    tiny_sd_path, pairs, tmp_path, prediction_type
):
    model = with_scheduler(tiny_sd_path, tmp_path / "model", prediction_type=prediction_type)
    trainer = DiffusionDPOTrainer(str(model), config(tmp_path, learning_rate=1e-3, max_steps=2), train_dataset=pairs)
    trainer.train()  # policy now differs from the reference
    parameters, hidden, _, _ = fixed_batch(trainer)
    unet = trainer.model.eval()

    torch.manual_seed(7)
    loss, metrics = trainer._compute_loss(unet, parameters, hidden, None, None)
    torch.manual_seed(7)
    latents = DiagonalGaussianDistribution(parameters.flatten(0, 1)).sample().unflatten(0, (-1, 2)) * 0.18215
    noise = torch.randn_like(latents[:, 0])
    t = torch.randint(0, 1000, (len(noise),))
    alpha_bar = trainer.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    # Like the trainer: chosen and rejected in one batch, the same noise and timestep for both images of a pair.
    clean = torch.cat([latents[:, 0], latents[:, 1]])
    noise, alpha_bar, t = noise.repeat(2, 1, 1, 1), alpha_bar.repeat(2, 1, 1, 1), t.repeat(2)
    noisy = alpha_bar.sqrt() * clean + (1 - alpha_bar).sqrt() * noise
    target = noise if prediction_type == "epsilon" else alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * clean
    errors = {}
    for name, net in (("policy", unet), ("ref", trainer.ref_unet)):
        with torch.no_grad():
            prediction = net(noisy, t, hidden.repeat(2, 1, 1)).sample
        errors[name, "w"], errors[name, "l"] = ((prediction - target) ** 2).mean(dim=(1, 2, 3)).chunk(2)
    inside = (
        -0.5 * 5000 * ((errors["policy", "w"] - errors["ref", "w"]) - (errors["policy", "l"] - errors["ref", "l"]))
    )
    assert inside.abs().max() > 0.1  # the policy moved: a wrong target or pairing would show
    expected = -torch.nn.functional.logsigmoid(inside).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert metrics["rewards/margins"] == pytest.approx(inside, rel=1e-4, abs=1e-4)

    torch.manual_seed(8)
    _, straight = trainer._loss_from_latents(unet, latents[:, 0], latents[:, 1], hidden, None, None)
    torch.manual_seed(8)
    _, swapped = trainer._loss_from_latents(unet, latents[:, 1], latents[:, 0], hidden, None, None)
    assert swapped["rewards/margins"] == pytest.approx(-straight["rewards/margins"], rel=1e-4, abs=1e-4)
    assert swapped["rewards/chosen"] == pytest.approx(straight["rewards/rejected"], rel=1e-4, abs=1e-4)


def test_rpo_adds_the_chosen_images_weighted_denoising_loss(tiny_sd_path, pairs, tmp_path):
    dpo = DiffusionDPOTrainer(str(tiny_sd_path), config(tmp_path), train_dataset=pairs)
    rpo = DiffusionDPOTrainer(str(tiny_sd_path), config(tmp_path, rpo_alpha=250.0), train_dataset=pairs)
    parameters, hidden, _, _ = fixed_batch(dpo)
    torch.manual_seed(7)
    dpo_loss, metrics = dpo._compute_loss(dpo.model, parameters, hidden, None, None)
    torch.manual_seed(7)
    rpo_loss, _ = rpo._compute_loss(rpo.model, parameters, hidden, None, None)
    expected = dpo_loss.item() + 250.0 * metrics["mse/policy_chosen"].mean().item()
    assert rpo_loss.item() == pytest.approx(expected, rel=1e-5) and rpo_loss.item() > dpo_loss.item() + 1
    assert rpo._card_hyperparameters()["rpo_alpha"] == 250.0 and "rpo_alpha" not in dpo._card_hyperparameters()
    with pytest.raises(ValueError, match="rpo_alpha.*sft=True"):
        config(tmp_path, rpo_alpha=1.0, sft=True)
    with pytest.raises(ValueError, match="rpo_alpha=-1.0.*must be >= 0"):
        config(tmp_path, rpo_alpha=-1.0)


def test_loss_types_follow_their_formulas():
    """Hinge is relu(1 - beta * logits); IPO pulls the unscaled logits towards 1 / (2 * beta) (beta is tau);
    APO-zero scores each image against the reference on its own."""
    policy_w, policy_l = torch.tensor([0.1000, 0.1000]), torch.tensor([0.1002, 0.0998])
    ref_w, ref_l = torch.tensor([0.1001, 0.1001]), torch.tensor([0.1001, 0.1001])
    logits = -0.5 * ((policy_w - ref_w) - (policy_l - ref_l))  # +1e-4 (chosen improved), -1e-4
    hinge, chosen, rejected = diffusion_dpo_loss(policy_w, policy_l, ref_w, ref_l, beta=5000, loss_type="hinge")
    assert hinge.tolist() == pytest.approx(torch.relu(1 - 5000 * logits).tolist(), abs=1e-4)
    assert hinge.tolist() == pytest.approx([0.5, 1.5], abs=1e-3)
    assert (chosen - rejected).tolist() == pytest.approx([0.5, -0.5], abs=1e-3)
    ipo, _, _ = diffusion_dpo_loss(policy_w, policy_l, ref_w, ref_l, beta=1000, loss_type="ipo")
    assert ipo.tolist() == pytest.approx([(1e-4 - 5e-4) ** 2, (-1e-4 - 5e-4) ** 2], rel=1e-3)
    assert DiffusionDPOConfig(output_dir="x", loss_type="ipo").beta == 1000
    apo, chosen, rejected = diffusion_dpo_loss(policy_w, policy_l, ref_w, ref_l, beta=5000, loss_type="apo_zero")
    assert chosen.tolist() == pytest.approx([0.25, 0.25], abs=1e-3)  # -0.5 * 5000 * (0.1000 - 0.1001)
    assert rejected.tolist() == pytest.approx([-0.25, 0.75], abs=1e-3)
    assert apo.tolist() == pytest.approx((1 - torch.sigmoid(chosen) + torch.sigmoid(rejected)).tolist(), rel=1e-6)
    assert apo[0] < apo[1]  # only the rejected image differs: raising its error lowers the loss
    assert DiffusionDPOConfig(output_dir="x", loss_type="hinge").beta == 5000
    sigmoid, _, _ = diffusion_dpo_loss(policy_w, policy_l, ref_w, ref_l)  # the paper's loss and beta by default
    assert sigmoid.tolist() == pytest.approx((-torch.nn.functional.logsigmoid(5000 * logits)).tolist(), rel=1e-6)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "apo_zero"])
def test_every_loss_type_learns_the_preference_of_a_few_pairs(tiny_sd_path, pairs, tmp_path, loss_type):
    """The trainer's own training_step and optimizer, repeated on 2 pairs with the same noise and timesteps."""
    args = config(tmp_path, learning_rate=1e-3, no_hflip=True, per_device_train_batch_size=2, loss_type=loss_type)
    trainer = DiffusionDPOTrainer(
        str(tiny_sd_path), args, train_dataset=pairs.select(range(2)), peft_config=LoraConfig(**LORA)
    )
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.create_optimizer_and_scheduler(num_training_steps=12)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by train() in a normal run
    history = []
    for _ in range(12):
        torch.manual_seed(0)
        history.append(trainer.training_step(trainer.model, batch).item())
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
    assert history[0] == pytest.approx(
        {"sigmoid": math.log(2), "hinge": 1.0, "ipo": 5e-4**2, "apo_zero": 1.0}[loss_type], rel=1e-5
    )
    assert history[-1] < 0.5 * history[0], history
    assert trainer._metrics["train"]["rewards/accuracies"][-1] == 1.0
    assert trainer._metrics["train"]["rewards/margins"][-1] > 0


def test_lora_with_alpha_four_times_r_reloads_to_the_trained_outputs(tiny_sd_path, pairs, tmp_path):
    lora = LoraConfig(**{**LORA, "lora_alpha": 16, "lora_dropout": 0.1})  # trained without dropout, saved so
    args = config(tmp_path, learning_rate=1e-2, max_steps=3)
    trainer = DiffusionDPOTrainer(str(tiny_sd_path), args, train_dataset=pairs, peft_config=lora)
    trainer.train()
    trainer.save_model()
    out = tmp_path / "out"
    assert (out / "pytorch_lora_weights.safetensors").exists() and not (out / "unet").exists()
    keys = list(load_file(out / "pytorch_lora_weights.safetensors"))
    assert keys and all(re.fullmatch(r"unet\..*\.lora\.(down|up)\.weight", key) for key in keys), keys[:4]

    pipeline = DiffusionPipeline.from_pretrained(tiny_sd_path)
    sample, t, hidden = torch.randn(2, 4, 16, 16), torch.tensor([10, 700]), torch.randn(2, 77, 32)
    with torch.no_grad():
        base = pipeline.unet(sample, t, hidden).sample
        pipeline.load_lora_weights(str(out))
        reloaded = pipeline.unet(sample, t, hidden).sample
        trained = trainer.model.eval()(sample, t, hidden).sample
    assert (trained - base).abs().max() > 1e-2
    torch.testing.assert_close(reloaded, trained, rtol=1e-4, atol=1e-5)  # channels_last rounds differently


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_dropout_is_off_so_training_forwards_are_repeatable(tiny_sd_path, pairs, tmp_path, lora):
    """As TRL's DPO: no dropout in the UNet (its own, configured here, nor the LoRA's)."""
    model = tmp_path / "model"
    shutil.copytree(tiny_sd_path, model)
    config_path = model / "unet" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "dropout": 0.3}))
    trainer = DiffusionDPOTrainer(
        str(model),
        config(tmp_path, learning_rate=1e-2),
        train_dataset=pairs,
        peft_config=LoraConfig(**{**LORA, "lora_dropout": 0.5}) if lora else None,
    )
    trainer.train()
    unet = trainer.model.train()
    sample, t, hidden = torch.randn(2, 4, 16, 16), torch.tensor([10, 700]), torch.randn(2, 77, 32)
    with torch.no_grad():
        assert torch.equal(unet(sample, t, hidden).sample, unet(sample, t, hidden).sample)


def test_identical_runs_are_reproducible(tiny_sd_path, pairs, tmp_path):
    """The LoRA is initialised after seeding, so two runs with one seed agree at every step."""
    runs = []
    for name in ("a", "b"):
        torch.manual_seed(len(runs))  # whatever the caller did before
        args = config(tmp_path / name, learning_rate=1e-2, max_steps=3, proportion_empty_prompts=0.3)
        trainer = DiffusionDPOTrainer(str(tiny_sd_path), args, train_dataset=pairs, peft_config=LoraConfig(**LORA))
        trainer.train()
        runs.append(losses(trainer))
    assert runs[0] == runs[1] and len(set(runs[0])) == 3


def test_an_accumulation_longer_than_an_epoch_is_flagged_before_training(tiny_sd_path, pairs, tmp_path, caplog):
    """transformers steps at every epoch's end: 8 accumulated batches of 4 over 16 pairs would update on 16."""
    with caplog.at_level("WARNING", logger="fifa_hf.trainer.trainer"):
        DiffusionDPOTrainer(str(tiny_sd_path), config(tmp_path, gradient_accumulation_steps=4), train_dataset=pairs)
        assert not [r for r in caplog.records if "gradient_accumulation_steps" in r.getMessage()]
        DiffusionDPOTrainer(str(tiny_sd_path), config(tmp_path, gradient_accumulation_steps=8), train_dataset=pairs)
    (warning,) = [r.getMessage() for r in caplog.records if "gradient_accumulation_steps" in r.getMessage()]
    assert "more than the 4 batches of an epoch (16 pairs)" in warning
    assert "each update averages 16 pairs, not 32" in warning


def test_a_pipeline_loaded_in_bf16_trains_a_fp32_lora_and_refuses_a_full_fine_tune(tiny_sd_path, pairs, tmp_path):
    pipeline = DiffusionPipeline.from_pretrained(tiny_sd_path, torch_dtype=torch.bfloat16)
    trainer = DiffusionDPOTrainer(pipeline, config(tmp_path), train_dataset=pairs, peft_config=LoraConfig(**LORA))
    trained = [p for p in trainer.model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    trainer.train()
    assert losses(trainer)[0] == pytest.approx(math.log(2), abs=1e-6) and math.isfinite(losses(trainer)[1])
    with pytest.raises(ValueError, match="float32.*bf16=True"):
        DiffusionDPOTrainer(
            DiffusionPipeline.from_pretrained(tiny_sd_path, torch_dtype=torch.bfloat16), config(tmp_path)
        )


def test_full_fine_tune_saves_a_loadable_unet_and_pipeline(tiny_sd_path, pairs, tmp_path):
    args = config(tmp_path, learning_rate=1e-3, save_full_pipeline=True)
    trainer = DiffusionDPOTrainer(str(tiny_sd_path), args, train_dataset=pairs)
    trainer.train()
    trainer.save_model()
    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "out", subfolder="unet")
    trained = trainer.model.state_dict()
    assert all(torch.equal(value, trained[name]) for name, value in loaded.state_dict().items())
    assert not all(torch.equal(v, trainer.ref_unet.state_dict()[k]) for k, v in loaded.state_dict().items())
    pipeline_unet = DiffusionPipeline.from_pretrained(tmp_path / "out").unet
    assert all(torch.equal(v, trained[k]) for k, v in pipeline_unet.state_dict().items())
    assert "lora" not in ModelCard.load(tmp_path / "out" / "README.md").data.tags


def test_sdxl_trains_with_micro_conditioning_and_cached_latents(tiny_sdxl_path, pairs, tmp_path):
    for cache in (False, True):
        args = config(tmp_path, max_steps=2, cache_latents=cache, learning_rate=1e-3)
        trainer = DiffusionDPOTrainer(str(tiny_sdxl_path), args, train_dataset=pairs, peft_config=LoraConfig(**LORA))
        assert trainer.is_sdxl
        trainer.train()
        assert losses(trainer)[0] == pytest.approx(math.log(2), abs=1e-6)
        assert losses(trainer)[1] != pytest.approx(math.log(2), abs=1e-7)
    cache = trainer._caches["train"]
    assert cache.latent_parameters[True].dtype == torch.float16 and cache.prompt_embeds.dtype == torch.float16
    trainer.save_model()
    pipeline = DiffusionPipeline.from_pretrained(tiny_sdxl_path)
    pipeline.load_lora_weights(str(tmp_path / "out"))
    assert "stable-diffusion-xl" in ModelCard.load(tmp_path / "out" / "README.md").data.tags
    time_ids = trainer._time_ids(torch.tensor([[48, 64]]), torch.tensor([[0, 8]]))
    assert time_ids.tolist() == [[48.0, 64.0, 0.0, 8.0, 32.0, 32.0]]


def test_resume_from_checkpoint_continues_with_the_same_losses(tiny_sd_path, pairs, tmp_path):
    common = dict(learning_rate=1e-3, max_steps=4, save_strategy="steps", save_steps=2, proportion_empty_prompts=0.3)
    straight = DiffusionDPOTrainer(
        str(tiny_sd_path), config(tmp_path / "a", **common), train_dataset=pairs, peft_config=LoraConfig(**LORA)
    )
    straight.train()
    resumed = DiffusionDPOTrainer(
        str(tiny_sd_path), config(tmp_path / "b", **common), train_dataset=pairs, peft_config=LoraConfig(**LORA)
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-2"))
    assert len(losses(straight)) == 4
    assert losses(resumed) == pytest.approx(losses(straight), rel=1e-5)  # steps 1-2 come from the checkpoint
    other = DiffusionDPOTrainer(  # a LoRA on other layers cannot take the checkpoint's weights
        str(tiny_sd_path), config(tmp_path / "c", **common), train_dataset=pairs,
        peft_config=LoraConfig(**{**LORA, "target_modules": ["to_q"]}),
    )  # fmt: skip
    with pytest.raises(
        ValueError, match=r"checkpoint-2: its LoRA does not fit this run's \(\d+ saved weights have no place"
    ):
        other.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-2"))
    scaled = DiffusionDPOTrainer(  # the same weights' names and shapes, twice their effect
        str(tiny_sd_path), config(tmp_path / "d", **common), train_dataset=pairs,
        peft_config=LoraConfig(**{**LORA, "lora_alpha": 8}),
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"trained with other settings \(lora_alpha: saved 4, this run 8\)"):
        scaled.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-2"))


def test_a_full_fine_tune_resumes_from_a_sharded_unet_checkpoint(tiny_sd_path, pairs, tmp_path):
    common = dict(learning_rate=1e-3, max_steps=3, save_strategy="steps", save_steps=2, per_device_train_batch_size=2)
    straight = DiffusionDPOTrainer(str(tiny_sd_path), config(tmp_path / "a", **common), train_dataset=pairs)
    straight.train()
    unet_dir = tmp_path / "a" / "out" / "checkpoint-2" / "unet"
    UNet2DConditionModel.from_pretrained(unet_dir).save_pretrained(unet_dir, max_shard_size="2MB")
    (unet_dir / "diffusion_pytorch_model.safetensors").unlink()
    assert (unet_dir / "diffusion_pytorch_model.safetensors.index.json").exists()
    resumed = DiffusionDPOTrainer(str(tiny_sd_path), config(tmp_path / "b", **common), train_dataset=pairs)
    resumed.train(resume_from_checkpoint=str(unet_dir.parent))
    assert losses(resumed) == pytest.approx(losses(straight), rel=1e-5)


def test_evaluation_is_deterministic_and_the_best_checkpoint_is_loaded_at_the_end(tiny_sd_path, pairs, tmp_path):
    args = config(
        tmp_path, learning_rate=1e-2, max_steps=3, eval_strategy="steps", eval_steps=1, save_strategy="steps",
        save_steps=1, load_best_model_at_end=True, metric_for_best_model="mse/ref_chosen", greater_is_better=False,
        proportion_empty_prompts=0.5, random_crop=True,
    )  # fmt: skip
    trainer = DiffusionDPOTrainer(
        str(tiny_sd_path),
        args,
        train_dataset=pairs,
        eval_dataset=pairs.select(range(8)),
        peft_config=LoraConfig(**LORA),
    )
    eval_batch = next(iter(trainer.get_eval_dataloader()))  # center crops, no flip, no caption dropout
    assert len(eval_batch["prompts"]) == 8 and "" not in eval_batch["prompts"]
    trainer.train()
    evaluations = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert len(evaluations) == 3 and {"eval_rewards/accuracies", "eval_mse/ref_chosen"} <= set(evaluations[0])
    # The reference's error on fixed eval noise never changes, so the first checkpoint stays the best one.
    assert len({entry["eval_mse/ref_chosen"] for entry in evaluations}) == 1
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-1")
    best = load_file(os.path.join(trainer.state.best_model_checkpoint, "pytorch_lora_weights.safetensors"))
    last = load_file(tmp_path / "out" / "checkpoint-3" / "pytorch_lora_weights.safetensors")
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    current = convert_state_dict_to_diffusers(get_peft_model_state_dict(trainer.model))
    assert all(torch.equal(current[key.removeprefix("unet.")], value) for key, value in best.items())
    assert not all(torch.equal(current[key.removeprefix("unet.")], value) for key, value in last.items())
    first, second = trainer.evaluate(), trainer.evaluate()
    for key in ("eval_loss", "eval_rewards/margins", "eval_mse/policy_chosen", "eval_mse/policy_rejected"):
        assert first[key] == second[key]


def test_ties_unknown_prediction_types_and_sft(tiny_sd_path, pairs, tmp_path):
    with pytest.raises(ValueError, match="drop_ties=False.*sft=True"):
        DiffusionDPOConfig(output_dir=str(tmp_path), drop_ties=False)
    with pytest.raises(ValueError, match="loss_type"):
        DiffusionDPOConfig(output_dir=str(tmp_path), loss_type="kto")
    with pytest.raises(ValueError, match="random_crop"):
        DiffusionDPOConfig(output_dir=str(tmp_path), cache_latents=True, random_crop=True)
    model = with_scheduler(tiny_sd_path, tmp_path / "sample-model", prediction_type="sample")
    with pytest.raises(ValueError, match="'sample'.*epsilon or v_prediction"):
        DiffusionDPOTrainer(str(model), config(tmp_path), train_dataset=pairs)

    ties = make_synthetic_pickapic(
        8, seed=1, image_size=32, tie_fraction=0.5, unlabeled_fraction=0, identical_fraction=0
    )
    sft = config(tmp_path, sft=True, drop_ties=False, max_steps=1, card_sample_steps=1, card_sample_prompts=["a cube"])
    trainer = DiffusionDPOTrainer(str(tiny_sd_path), sft, train_dataset=ties)
    assert trainer.ref_unet is None and len(trainer.train_dataset) == 8
    trainer.train()
    first = trainer.state.log_history[0]
    assert "mse/policy_chosen" in first and "rewards/margins" not in first
    trainer.create_model_card()  # no reference to sample: the grid has this model's row only, and says so
    assert "This model's samples" in (tmp_path / "out" / "README.md").read_text()


def test_two_processes_train_agree_save_once_and_draw_their_own_noise(tiny_sd_path, tmp_path):
    data = tmp_path / "data"
    make_synthetic_pickapic(16, seed=0, image_size=32, tie_fraction=0).save_to_disk(data)
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
        os.path.join(os.path.dirname(__file__), "ddp_worker.py"),
        "--model_name_or_path", str(tiny_sd_path), "--dataset_name", str(data), "--output_dir", str(out),
        "--use_peft", "true", "--lora_r", "4", "--lora_alpha", "4", "--per_device_train_batch_size", "2",
        "--max_steps", "3", "--learning_rate", "1e-2", "--report_to", "none", "--use_cpu", "true",
        "--save_strategy", "no", "--logging_steps", "1", "--cache_latents", "true", "--card_sample_steps", "0",
    ]  # fmt: skip
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # one model, trained in step
    assert ranks[0]["timesteps"] != ranks[1]["timesteps"]  # each process its own noise and timesteps
    assert ranks[0]["vae_encodes"] > 0 and ranks[1]["vae_encodes"] == 0  # the latent cache is built once
    assert ranks[0]["cached_pairs"] == ranks[1]["cached_pairs"] == 16
    assert sorted(name for name in os.listdir(out) if name.startswith("saved-by-rank")) == ["saved-by-rank0"]
    assert (out / "pytorch_lora_weights.safetensors").exists()
    assert not any(name.startswith(".latent-cache") for name in os.listdir(out))


@pytest.mark.parametrize(
    "model, checkpointing, bf16, lora",
    [
        ("tiny_sd_path", False, False, True),
        ("tiny_sd_path", True, False, True),
        ("tiny_sdxl_path", False, False, True),
        ("tiny_sd_path", False, True, True),
        ("tiny_sd_path", False, True, False),
    ],
    ids=["sd", "sd-activation-checkpointing", "sdxl", "sd-bf16", "sd-full-bf16"],
)
def test_a_step_s_shortcuts_give_the_same_loss_and_gradients(
    pairs, tmp_path, request, model, checkpointing, bf16, lora
):
    """With LoRA the reference forward computes the layers before the first adapter once and the policy reuses them;
    LoRA and attention layers run lean forwards. All are exact: the step is the same bit for bit without them."""
    args = config(tmp_path, learning_rate=1e-2, activation_checkpointing=checkpointing, resolution=32, bf16=bf16)
    peft_config = LoraConfig(**{**LORA, "lora_alpha": 8}) if lora else None  # scaling 2
    trainer = DiffusionDPOTrainer(
        str(request.getfixturevalue(model)), args, train_dataset=pairs, peft_config=peft_config
    )
    trainer.train()  # the adapters (or the UNet) moved away from the reference
    batch = trainer._batch_from_pixels(next(iter(trainer.get_train_dataloader())))
    first_block_runs = []
    trainer.model.down_blocks[0].resnets[0].register_forward_hook(lambda *_: first_block_runs.append(1))
    shortcuts = (trainer._shared_prefix, trainer._lean_lora_layers, trainer._lean_attentions)
    attentions = [m for m in trainer.model.modules() if isinstance(m, Attention)]
    assert len(shortcuts[1]) == len(trainer._lora_layers) == (4 * len(attentions) if lora else 0)
    assert len(shortcuts[2]) == len(attentions) * (1 if lora else 2)  # a full fine-tune's reference too
    results = []
    for prefix, lora_layers, attention_layers in (shortcuts, (None, [], [])):
        trainer._shared_prefix, trainer._lean_lora_layers, trainer._lean_attentions = (
            prefix,
            lora_layers,
            attention_layers,
        )
        torch.manual_seed(7)
        with trainer.compute_loss_context_manager():
            loss, _ = trainer._compute_loss(trainer.model, *batch)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in trainer._trainable_parameters]))
        trainer.model.zero_grad()
    (fast_loss, fast_grads), (loss, grads) = results
    if lora:
        assert len(first_block_runs) == 1 + 2  # once with the shared prefix, twice without
        assert shortcuts[0].reused > 0
    assert torch.equal(fast_loss, loss) and fast_loss != pytest.approx(math.log(2))
    assert all(torch.equal(a, b) for a, b in zip(fast_grads, grads))
    assert all(type(m.processor) is AttnProcessor2_0 for m in attentions)  # diffusers' own processors again


def test_a_full_fine_tune_has_no_shared_prefix(tiny_sd_path, pairs, tmp_path):
    trainer = DiffusionDPOTrainer(str(tiny_sd_path), config(tmp_path), train_dataset=pairs)
    assert trainer._shared_prefix is None


def test_a_lora_trains_its_adapters_while_the_frozen_layers_stay_in_inference_mode(tiny_sd_path, pairs, tmp_path):
    """Frozen resnets in training mode copy channels-last activations to contiguous ones at every call."""

    class Modes(TrainerCallback):
        def __init__(self):
            self.seen = set()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.seen |= {(type(m).__name__, m.training) for m in model.modules() if "Resnet" in type(m).__name__}
            self.seen |= {("lora", m.training) for m in model.modules() if isinstance(m, BaseTunerLayer)}

    modes = Modes()
    trainer = DiffusionDPOTrainer(
        str(tiny_sd_path), config(tmp_path), train_dataset=pairs, peft_config=LoraConfig(**LORA), callbacks=[modes]
    )
    trainer.train()
    assert modes.seen == {("ResnetBlock2D", False), ("lora", True)}


def test_a_dora_run_resumes_with_the_same_losses(tiny_sd_path, pairs, tmp_path):
    common = dict(learning_rate=1e-3, max_steps=2, save_strategy="steps", save_steps=1, per_device_train_batch_size=2)
    runs = []
    for name, checkpoint in (("a", None), ("b", tmp_path / "a" / "out" / "checkpoint-1")):
        dora = LoraConfig(**{**LORA, "use_dora": True})  # its magnitude vectors are saved and loaded too
        trainer = DiffusionDPOTrainer(
            str(tiny_sd_path), config(tmp_path / name, **common), train_dataset=pairs, peft_config=dora
        )
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        runs.append(losses(trainer))
    assert runs[1] == pytest.approx(runs[0], rel=1e-5)


def test_each_node_hands_its_latent_cache_to_its_processes_through_its_own_file(tmp_path, monkeypatch):
    import contextlib

    from fifa_hf.trainer import latent_cache

    seen_at_the_barrier = []

    class SecondNodesMainProcess:  # global rank 2 of 4: the first process of the second node, output_dir shared
        num_processes, process_index, local_process_index, is_local_main_process = 4, 2, 0, True
        local_main_process_first = staticmethod(contextlib.nullcontext)

        def wait_for_everyone(self):
            seen_at_the_barrier.extend(os.listdir(tmp_path))

    monkeypatch.setattr(latent_cache, "PartialState", SecondNodesMainProcess)
    built = latent_cache.LatentCache(
        latent_parameters={False: torch.zeros(1, 2, 8, 4, 4)}, crop_top_lefts={False: torch.zeros(1, 2)},
        original_sizes=torch.zeros(1, 2), prompt_index=torch.zeros(1, dtype=torch.long),
        prompt_embeds=torch.zeros(1, 4, 8), empty_prompt_embeds=torch.zeros(1, 4, 8),
    )  # fmt: skip
    assert latent_cache.shared_latent_cache(lambda: built, str(tmp_path), "latent-cache-train") is built
    assert seen_at_the_barrier == [".latent-cache-train-node2.safetensors"]  # the first node's is "-node0"
    assert os.listdir(tmp_path) == []  # removed once every process has read it
