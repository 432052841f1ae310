import math
import os
import re
import subprocess
import sys

import pytest
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from huggingface_hub import ModelCard
from peft import LoraConfig

from fifa_hf.trainer import DiffusionDPOConfig, DiffusionDPOTrainer
from fifa_hf.world.synthetic import make_synthetic_pickapic

LORA = dict(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights="gaussian")


@pytest.fixture(scope="module")
def pairs():
    return make_synthetic_pickapic(
        16, seed=0, image_size=48, tie_fraction=0, unlabeled_fraction=0, identical_fraction=0
    )


def config(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=2, logging_steps=1,
        report_to="none", save_strategy="no", use_cpu=True, seed=0, dataloader_num_workers=0,
    )  # fmt: skip
    values.update(overrides)
    return DiffusionDPOConfig(**values)


def losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("lora", [True, False])
def test_initial_loss_is_log2_with_accuracy_one_half(tiny_sd_path, pairs, tmp_path, lora):
    trainer = DiffusionDPOTrainer(
        str(tiny_sd_path),
        config(tmp_path, max_steps=1),
        train_dataset=pairs,
        peft_config=LoraConfig(**LORA) if lora else None,
    )
    trainer.train()
    first = trainer.state.log_history[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/accuracies"] == 0.5 and first["rewards/margins"] == 0.0
    assert first["mse/policy_chosen"] == pytest.approx(first["mse/ref_chosen"])
    expected = {"rewards/chosen", "rewards/rejected", "mse/policy_rejected", "mse/ref_rejected"}
    assert expected <= set(first)


def fixed_batch(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer._batch_from_pixels(batch)


def test_loss_matches_an_independent_computation_and_swapping_negates_margins(tiny_sd_path, pairs, tmp_path):
    trainer = DiffusionDPOTrainer(
        str(tiny_sd_path), config(tmp_path, learning_rate=1e-3, max_steps=2), train_dataset=pairs
    )
    trainer.train()  # policy now differs from the reference
    parameters, hidden, _, _ = fixed_batch(trainer)
    unet = trainer.model.eval()

    torch.manual_seed(7)
    loss, metrics = trainer._compute_loss(unet, parameters, hidden, None, None)
    torch.manual_seed(7)
    latents = DiagonalGaussianDistribution(parameters.flatten(0, 1)).sample().unflatten(0, (-1, 2)) * 0.18215
    noise = torch.randn_like(latents[:, 0])
    t = torch.randint(0, 1000, (len(noise),))
    scheduler = trainer.noise_scheduler
    errors = {}
    for name, net in (("policy", unet), ("ref", trainer.ref_unet)):
        for i, image in enumerate(("w", "l")):
            noisy = scheduler.add_noise(latents[:, i], noise, t)
            with torch.no_grad():
                prediction = net(noisy, t, hidden).sample
            errors[name, image] = ((prediction - noise) ** 2).mean(dim=(1, 2, 3))
    inside = (
        -0.5 * 5000 * ((errors["policy", "w"] - errors["ref", "w"]) - (errors["policy", "l"] - errors["ref", "l"]))
    )
    expected = -torch.nn.functional.logsigmoid(inside).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)
    assert metrics["rewards/margins"] == pytest.approx(inside, rel=1e-4, abs=1e-4)

    torch.manual_seed(8)
    _, straight = trainer._loss_from_latents(unet, latents[:, 0], latents[:, 1], hidden, None, None)
    torch.manual_seed(8)
    _, swapped = trainer._loss_from_latents(unet, latents[:, 1], latents[:, 0], hidden, None, None)
    assert swapped["rewards/margins"] == pytest.approx(-straight["rewards/margins"], rel=1e-4, abs=1e-4)
    assert swapped["rewards/chosen"] == pytest.approx(straight["rewards/rejected"], rel=1e-4, abs=1e-4)


def test_loss_falls_when_overfitting_a_few_pairs(tiny_sd_path, pairs, tmp_path):
    """The trainer's own training_step and optimizer, repeated on 2 pairs with the same noise and timesteps."""
    args = config(tmp_path, learning_rate=1e-3, no_hflip=True, per_device_train_batch_size=2)
    trainer = DiffusionDPOTrainer(
        str(tiny_sd_path), args, train_dataset=pairs.select(range(2)), peft_config=LoraConfig(**LORA)
    )
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.create_optimizer_and_scheduler(num_training_steps=30)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by train() in a normal run
    history = []
    for _ in range(30):
        torch.manual_seed(0)
        history.append(trainer.training_step(trainer.model, batch).item())
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
    assert history[0] == pytest.approx(math.log(2), abs=1e-6)
    assert history[-1] < 0.5 * history[0], history


def test_lora_saves_in_diffusers_format_and_changes_the_images(tiny_sd_path, pairs, tmp_path):
    args = config(tmp_path, learning_rate=1e-2, max_steps=3)
    trainer = DiffusionDPOTrainer(str(tiny_sd_path), args, train_dataset=pairs, peft_config=LoraConfig(**LORA))
    trainer.train()
    trainer.save_model()
    out = tmp_path / "out"
    assert (out / "pytorch_lora_weights.safetensors").exists() and not (out / "unet").exists()

    pipeline = DiffusionPipeline.from_pretrained(tiny_sd_path)
    before = pipeline("a red circle", num_inference_steps=2, output_type="np", generator=torch.manual_seed(0)).images
    pipeline.load_lora_weights(str(out))
    after = pipeline("a red circle", num_inference_steps=2, output_type="np", generator=torch.manual_seed(0)).images
    assert abs(after - before).max() > 1e-4

    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "diffusers" and card.data.base_model == str(tiny_sd_path)
    assert {"text-to-image", "lora", "stable-diffusion", "diffusion-dpo", "fifa", "trl"} <= set(card.data.tags)
    assert "2311.12908" not in card.text or "wallace2024diffusion" in card.text
    assert "beta | 5000.0" in card.text and "yang2025fifa" in card.text
    snippet = re.search(r"```python\n(.*?)```", card.text, re.S).group(1)
    snippet = snippet.replace("a photo of an astronaut riding a horse", "x").replace(
        ").images[0]", ", num_inference_steps=1).images[0]"
    )
    namespace = {}
    exec(snippet, namespace)  # the quick start really loads the result
    assert namespace["image"].size == (32, 32)


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


def test_sft_and_loss_types(tiny_sd_path, pairs, tmp_path):
    trainer = DiffusionDPOTrainer(str(tiny_sd_path), config(tmp_path, sft=True, max_steps=1), train_dataset=pairs)
    assert trainer.ref_unet is None
    trainer.train()
    assert (
        "mse/policy_chosen" in trainer.state.log_history[0] and "rewards/margins" not in trainer.state.log_history[0]
    )
    with pytest.raises(ValueError, match="loss_type"):
        DiffusionDPOConfig(output_dir=str(tmp_path), loss_type="kto")
    with pytest.raises(ValueError, match="random_crop"):
        DiffusionDPOConfig(output_dir=str(tmp_path), cache_latents=True, random_crop=True)


def test_push_to_hub_sends_weights_and_card(tiny_sd_path, pairs, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    sent = {}
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    from huggingface_hub import RepoUrl

    def create_repo(self, repo_id, **kwargs):
        sent.setdefault("repos", []).append(repo_id)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "whoami", lambda self, *a, **k: {"name": "user"})

    def create_commit(self, repo_id, operations, **kwargs):
        sent["commit"] = (repo_id, kwargs["repo_type"], sorted(op.path_in_repo for op in operations))
        return "commit-url"

    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    args = config(tmp_path, max_steps=1, hub_model_id="user/tiny-dpo")
    trainer = DiffusionDPOTrainer(str(tiny_sd_path), args, train_dataset=pairs, peft_config=LoraConfig(**LORA))
    trainer.train()
    trainer.push_to_hub(dataset_name="user/pickapic-fifa")
    repo_id, repo_type, files = sent["commit"]
    assert (repo_id, repo_type) == ("user/tiny-dpo", "model")
    assert files == ["README.md", "pytorch_lora_weights.safetensors"]
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.datasets == ["user/pickapic-fifa"] and 'load_lora_weights("user/tiny-dpo")' in card.text


DDP_SCRIPT = os.path.join(os.path.dirname(__file__), "..", "examples", "train.py")


def test_two_processes_train_agree_and_save_once(tiny_sd_path, tmp_path):
    data = tmp_path / "data"
    make_synthetic_pickapic(16, seed=0, image_size=32, tie_fraction=0).save_to_disk(data)
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
        os.path.join(os.path.dirname(__file__), "ddp_worker.py"), DDP_SCRIPT,
        "--model_name_or_path", str(tiny_sd_path), "--dataset_name", str(data), "--output_dir", str(out),
        "--use_peft", "true", "--lora_r", "4", "--lora_alpha", "4", "--per_device_train_batch_size", "2",
        "--max_steps", "3", "--learning_rate", "1e-2", "--report_to", "none", "--use_cpu", "true",
        "--save_strategy", "no", "--logging_steps", "1",
    ]  # fmt: skip
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-4000:]
    checksums = sorted((out / name).read_text() for name in os.listdir(out) if name.startswith("checksum-rank"))
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    saves = sorted(name for name in os.listdir(out) if name.startswith("saved-by-rank"))
    assert saves == ["saved-by-rank0"]
    assert (out / "pytorch_lora_weights.safetensors").exists()
