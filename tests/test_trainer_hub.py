"""`fifa-hf train`, the model card and Hub pushes, offline: the Hub's servers are mocked, what they receive is checked."""

import math
import re
import shutil

import datasets
import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi, ModelCard, RepoUrl
from peft import LoraConfig
from PIL import Image

from fifa_hf.trainer import DiffusionDPOConfig, DiffusionDPOTrainer
from fifa_hf.trainer.script import main
from fifa_hf.world.synthetic import make_synthetic_pickapic

LORA = dict(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights="gaussian")
SECRET = "hf_secret_token_123"


@pytest.fixture(scope="module")
def pairs():
    return make_synthetic_pickapic(
        8, seed=0, image_size=40, tie_fraction=0, unlabeled_fraction=0, identical_fraction=0
    )


@pytest.fixture
def hub(monkeypatch):
    """A mocked Hub: records every repo creation and commit (repo, message, files, token) instead of sending it."""
    sent = {"repos": [], "commits": []}

    def create_repo(self, repo_id, **kwargs):
        sent["repos"].append(
            (repo_id, kwargs.get("repo_type"), kwargs.get("private"), kwargs.get("token", self.token))
        )
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        files = sorted(op.path_in_repo for op in operations)
        sent["commits"].append(dict(repo=repo_id, message=kwargs["commit_message"], files=files, token=self.token))
        return f"https://huggingface.co/{repo_id}/commit/{len(sent['commits'])}"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return sent


def test_push_to_hub_in_the_args_commits_weights_and_card_at_every_save_without_leaking_the_token(
    tiny_sd_path, pairs, tmp_path, hub
):
    model = tmp_path / "tiny-sd"
    shutil.copytree(tiny_sd_path, model)
    (model / "README.md").write_text("---\nlicense: creativeml-openrail-m\n---\n# tiny\n")
    out = tmp_path / "out"
    args = DiffusionDPOConfig(
        output_dir=str(out), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2, logging_steps=1,
        save_strategy="steps", save_steps=1, report_to="none", use_cpu=True, push_to_hub=True,
        hub_model_id="user/tiny-dpo", hub_strategy="every_save", hub_token=SECRET, hub_always_push=True,
        card_sample_steps=2, card_sample_prompts=["a red circle", "a blue square"],
    )  # fmt: skip
    trainer = DiffusionDPOTrainer(str(model), args, train_dataset=pairs, peft_config=LoraConfig(**LORA))
    trainer.train()
    (out / ".latent-cache-train-node0.safetensors").write_bytes(b"a killed run's scratch file")  # never published
    trainer.save_model()  # as a user would: with push_to_hub in the args it also pushes
    trainer._finish_current_push()

    commits = hub["commits"]
    assert [c["message"] for c in commits] == [
        "Training in progress, step 1", "Training in progress, step 2", "Model save"
    ]  # fmt: skip
    assert all(c["repo"] == "user/tiny-dpo" and c["token"] == SECRET for c in commits)
    for commit in commits[:2]:
        assert {"README.md", "pytorch_lora_weights.safetensors"} <= set(commit["files"])
    assert commits[-1]["files"] == [
        "README.md", "pytorch_lora_weights.safetensors", "samples/0.jpg", "samples/1.jpg", "samples/grid.jpg"
    ]  # fmt: skip
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert torch.load(out / "checkpoint-1" / "training_args.bin", weights_only=False).hub_token is None

    card = ModelCard.load(out / "README.md")
    assert card.text.lstrip().startswith("# user/tiny-dpo\n")
    assert card.data.license == "creativeml-openrail-m" and card.data.base_model is None
    assert set(DiffusionDPOTrainer._tag_names) | {"lora", "text-to-image"} <= set(card.data.tags)
    assert card.data.widget == [
        {"text": "a red circle", "output": {"url": "samples/0.jpg"}},
        {"text": "a blue square", "output": {"url": "samples/1.jpg"}},
    ]
    grid = Image.open(out / "samples" / "grid.jpg")
    assert grid.size == (2 * 32, 2 * 32)  # before and after, two prompts
    assert not torch.equal(  # the LoRA changed the samples
        torch.tensor(list(grid.crop((0, 0, 64, 32)).getdata())),
        torch.tensor(list(grid.crop((0, 32, 64, 64)).getdata())),
    )
    for absent in ("huggingface.co//", "github.com", str(tmp_path)):
        assert absent not in card.content
    assert "`tiny-sd` (a local model)" in card.text and "https://huggingface.co/papers/2311.12908" in card.text
    assert re.search(r"\| train \| 2 \| [\d.]+ \| [\d.]+ \| [-\d.e]+ \|", card.text)  # step, loss, accuracy, margin
    assert f"- diffusers: {__import__('diffusers').__version__}" in card.text


@pytest.fixture
def hub_cache(tiny_sd_path, tmp_path, monkeypatch):
    """The tiny SD as the Hub's cache holds `org/tiny-sd` after a download (read offline)."""
    cache = tmp_path / "hub-cache"
    repo = cache / "models--org--tiny-sd"
    shutil.copytree(tiny_sd_path, repo / "snapshots" / ("a" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_fifa_hf_train_applies_its_flags_and_cards_a_hub_base_model(hub_cache, tmp_path, monkeypatch):
    data = tmp_path / "pickapic-fifa"
    rows = make_synthetic_pickapic(12, seed=0, image_size=40, tie_fraction=0, unlabeled_fraction=0)
    datasets.DatasetDict({"train": rows.select(range(8)), "test": rows.select(range(8, 12))}).save_to_disk(data)
    monkeypatch.chdir(tmp_path)
    trainer = main([
        "--model_name_or_path", "org/tiny-sd", "--dataset_name", "pickapic-fifa", "--output_dir", "run",
        "--use_peft", "true", "--lora_r", "4", "--lora_alpha", "16", "--use_rslora", "true",
        "--per_device_train_batch_size", "4", "--max_steps", "2", "--learning_rate", "1e-2", "--logging_steps", "1",
        "--eval_strategy", "steps", "--eval_steps", "2", "--dataset_test_split", "test", "--save_strategy", "no",
        "--report_to", "none", "--use_cpu", "true", "--card_sample_steps", "1", "--card_sample_prompts", "a cat",
    ])  # fmt: skip
    unet = trainer.model
    assert unet.peft_config["default"].use_rslora and unet.peft_config["default"].lora_alpha == 16
    assert len(trainer.eval_dataset) == 4 and any("eval_loss" in entry for entry in trainer.state.log_history)
    assert trainer.state.log_history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)

    card = ModelCard.load(tmp_path / "run" / "README.md")
    assert card.data.base_model == "org/tiny-sd" and card.text.lstrip().startswith("# run\n")
    assert "[org/tiny-sd](https://huggingface.co/org/tiny-sd)" in card.text
    assert "`pickapic-fifa` (a local dataset)" in card.text and card.data.datasets is None
    assert "| eval |" in card.text and str(tmp_path) not in card.content

    snippet = re.search(r"```python\n(.*?)```", card.text, re.S).group(1)
    snippet = snippet.replace("a photo of an astronaut riding a horse", "x").replace(
        ").images[0]", ", num_inference_steps=1, output_type='pt').images[0]"
    )
    namespace = {"torch": torch}
    exec(snippet, namespace)  # the quick start loads the base model from the Hub (cache) and this LoRA
    pipeline = namespace["pipeline"]
    sample, t, hidden = torch.randn(1, 4, 16, 16), torch.tensor([300]), torch.randn(1, 77, 32)
    with torch.no_grad():
        # rsLoRA scales by alpha / sqrt(r) = 8, not alpha / r = 4: the reloaded adapter acts as trained
        torch.testing.assert_close(pipeline.unet(sample, t, hidden).sample, unet.eval()(sample, t, hidden).sample)


def test_fifa_hf_train_loads_the_pipeline_in_the_given_dtype(tiny_sd_path, pairs, tmp_path):
    data = tmp_path / "data"
    pairs.save_to_disk(data)
    trainer = main([
        "--model_name_or_path", str(tiny_sd_path), "--dataset_name", str(data), "--output_dir", str(tmp_path / "o"),
        "--dtype", "bfloat16", "--use_peft", "true", "--max_steps", "1", "--use_cpu", "true", "--report_to", "none",
        "--card_sample_steps", "0", "--logging_steps", "1", "--per_device_train_batch_size", "4",
    ])  # fmt: skip
    assert trainer.model.conv_in.weight.dtype == torch.bfloat16 and trainer.pipeline.vae.dtype == torch.bfloat16
    assert trainer._trainable_parameters and all(p.dtype == torch.float32 for p in trainer._trainable_parameters)
    assert trainer.state.log_history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--dataset_streaming", "true"], "--dataset_streaming"),
        (["--load_in_4bit", "true"], "--load_in_4bit"),
        (["--use_peft", "true", "--lora_modules_to_save", "conv_in"], "--lora_modules_to_save"),
        (["--use_dora", "true"], "--use_dora.*--use_peft is false"),
        (["--dtype", "auto"], "--dtype 'auto'"),
        (["--attn_implementation", "sdpa"], "--attn_implementation"),
        (["--model_revision", "v2"], "--model_revision applies to Hub models"),
        (["--dataset_config", "default"], "--dataset_config 'default'"),
        (["--dataset_name", "missing-dir/x/y"], "--dataset_name: the local path"),
        (["--eval_strategy", "steps", "--dataset_test_split", "validation"], "--dataset_test_split 'validation'"),
        (["--fsdp", "full_shard"], "DeepSpeed and FSDP are not supported"),
    ],
)
def test_fifa_hf_train_refuses_what_it_cannot_apply(tiny_sd_path, pairs, tmp_path, flags, message):
    data = tmp_path / "data"
    pairs.save_to_disk(data)
    base = [
        "--model_name_or_path",
        str(tiny_sd_path),
        "--dataset_name",
        str(data),
        "--output_dir",
        str(tmp_path / "o"),
    ]
    with pytest.raises(ValueError, match=message):
        main([*base, "--use_cpu", "true", "--report_to", "none", *flags])
    assert not (tmp_path / "o").exists()


def test_fifa_hf_train_checks_the_data_before_the_model(tiny_sd_path, pairs, tmp_path):
    pairs.to_parquet(tmp_path / "pairs.parquet")  # one split, whatever name it is asked by
    base = ["--output_dir", str(tmp_path / "o"), "--use_cpu", "true", "--report_to", "none"]
    with pytest.raises(ValueError, match="--dataset_test_split 'test': .* holds a single split"):
        main([*base, "--model_name_or_path", str(tiny_sd_path), "--dataset_name", str(tmp_path / "pairs.parquet"),
              "--eval_strategy", "steps"])  # fmt: skip
    pairs.rename_column("caption", "text").to_parquet(tmp_path / "other.parquet")
    with pytest.raises(ValueError, match=r"--dataset_name '.*other.parquet': Missing column\(s\) \['caption'\]"):
        main(
            [
                *base,
                "--model_name_or_path",
                "someone/not-downloaded",
                "--dataset_name",
                str(tmp_path / "other.parquet"),
            ]
        )
    assert not (tmp_path / "o").exists()


def test_cards_name_hub_models_by_their_id_and_local_ones_by_their_folder(tiny_sd_path, tmp_path):
    from fifa_hf.trainer.model_card import display_name, hub_id

    snapshot = tmp_path / "hub" / "models--org--tiny-sd" / "snapshots" / ("a" * 40)
    assert hub_id(str(snapshot)) == "org/tiny-sd" and hub_id("org/tiny-sd") == "org/tiny-sd"
    assert hub_id(str(tiny_sd_path)) is None and hub_id("./tiny-sd") is None and hub_id("tiny-sd") is None
    assert display_name(str(tiny_sd_path)) == "tiny-sd" and display_name(str(snapshot)) == "org/tiny-sd"


def test_the_card_describes_the_sample_grid_it_shows_and_tables_the_hyperparameters():
    from fifa_hf.cards import diffusion_model_card

    hyperparameters = {"beta": 5000, "learning_rate": 1e-05}
    settings = dict(
        model_id="user/sd-dpo", base_model="tiny-sd", base_model_id=None, is_sdxl=False, hyperparameters=hyperparameters,
        paper_citation="", samples=[("a red circle", "samples/0.jpg")], sample_grid="samples/grid.jpg",
    )  # fmt: skip
    lora = diffusion_model_card(is_lora=True, **settings).text  # adapters off: the base model's row
    assert "Top row: the base model; bottom row: this model (same prompts and seeds)." in lora
    sft = diffusion_model_card(is_lora=False, grid_shows_base=False, **settings).text  # a full SFT run: one row
    assert "This model's samples (same prompts and seeds)." in sft and "Top row" not in sft
    for card in (lora, sft):
        assert "| hyperparameter | value |\n|---|---|\n| beta | 5000 |\n| learning_rate | 1e-05 |\n" in card


def test_a_float16_vae_that_asks_for_float32_encodes_in_float32(tiny_sdxl_path, pairs, tmp_path):
    from peft import LoraConfig

    from fifa_hf.pipelines import load_pipeline
    from fifa_hf.trainer import DiffusionDPOConfig, DiffusionDPOTrainer

    pipeline = load_pipeline(str(tiny_sdxl_path), torch_dtype=torch.float16)
    assert pipeline.vae.config.force_upcast  # as SDXL's own VAE config says
    args = DiffusionDPOConfig(output_dir=str(tmp_path / "o"), use_cpu=True, report_to="none", card_sample_steps=0)
    lora = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    trainer = DiffusionDPOTrainer(pipeline, args, train_dataset=pairs, peft_config=lora)
    assert trainer.pipeline.vae.dtype == torch.float32 and trainer.pipeline.unet.dtype == torch.float16


@pytest.mark.parametrize("model", ["tiny_sd_path", "tiny_sdxl_path"])
def test_a_float16_pipeline_trains_a_lora_evaluates_and_samples_its_card(
    model, pairs, tmp_path, request, tiny_clip_path
):
    from peft import LoraConfig

    from fifa_hf.evaluation import GenerationSettings
    from fifa_hf.evaluation.callback import RewardEvaluationCallback
    from fifa_hf.pipelines import load_pipeline
    from fifa_hf.scoring.rewards import CLIPRewardModel
    from fifa_hf.trainer import DiffusionDPOConfig, DiffusionDPOTrainer

    pipeline = load_pipeline(str(request.getfixturevalue(model)), torch_dtype=torch.float16)
    args = DiffusionDPOConfig(
        output_dir=str(tmp_path / "o"), use_cpu=True, report_to="none", max_steps=1, resolution=32,
        card_sample_steps=1, card_sample_prompts=["a red circle"],
    )  # fmt: skip
    lora = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    trainer = DiffusionDPOTrainer(pipeline, args, train_dataset=pairs, peft_config=lora)
    reward = CLIPRewardModel(str(tiny_clip_path), device="cpu")
    callback = RewardEvaluationCallback(
        trainer,
        ["a red circle"],
        [reward],
        eval_steps=1,
        settings=GenerationSettings(num_inference_steps=1, resolution=32),
    )
    trainer.add_callback(callback)
    trainer.train()  # the evaluations decode float16 latents, and the VAE encodes in float32
    assert [step for step, _ in callback.history] == [0, 1]
    trainer.save_model()  # so do the card's samples
    assert (tmp_path / "o" / "samples" / "grid.jpg").exists() and "## Samples" in (
        tmp_path / "o" / "README.md"
    ).read_text()
    assert trainer.pipeline.vae.dtype == torch.float32  # encoding stays in float32
