"""The trainer's data preparation: every image decoded whole before training, failures dropped and counted."""

import datasets
import pytest
from peft import LoraConfig

from fifa_hf.trainer import DiffusionDPOConfig, DiffusionDPOTrainer
from fifa_hf.world.synthetic import make_synthetic_pickapic


def config(tmp_path, **overrides):
    return DiffusionDPOConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=1, report_to="none",
        save_strategy="no", use_cpu=True, dataloader_num_workers=0, **overrides,
    )  # fmt: skip


def test_a_truncated_jpeg_is_dropped_and_counted_before_training(tiny_sd_path, tmp_path):
    rows = make_synthetic_pickapic(8, seed=0, image_size=32, tie_fraction=0, unlabeled_fraction=0,
                                   identical_fraction=0).to_pandas()  # fmt: skip
    rows.at[5, "jpg_1"] = rows.at[5, "jpg_1"][:-200]  # the last 200 bytes lost: its header still reads fine
    data = datasets.Dataset.from_pandas(rows, preserve_index=False)
    lora = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"])
    trainer = DiffusionDPOTrainer(
        str(tiny_sd_path), config(tmp_path, cache_latents=True), train_dataset=data, peft_config=lora
    )  # the latent cache decodes every image in the constructor: a kept truncated file would crash here
    report = trainer.dataset_reports["train"]
    assert (report.rows_in, report.rows_kept, report.dropped) == (8, 7, {"undecodable_image": 1})
    assert len(trainer.train_dataset) == 7 and len(trainer._caches["train"].latent_parameters[False]) == 7


def test_an_empty_dataset_is_a_clear_error(tiny_sd_path, tmp_path):
    empty = datasets.Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []})
    with pytest.raises(ValueError, match="train_dataset holds no usable preference pair: it has no rows"):
        DiffusionDPOTrainer(str(tiny_sd_path), config(tmp_path), train_dataset=empty)


@pytest.mark.parametrize("disable_tqdm", [False, True])
def test_the_latent_cache_shows_one_bar_unless_disable_tqdm(tiny_sd_path, tmp_path, capsys, disable_tqdm):
    data = make_synthetic_pickapic(4, seed=0, image_size=32, tie_fraction=0, unlabeled_fraction=0)
    DiffusionDPOTrainer(
        str(tiny_sd_path), config(tmp_path, cache_latents=True, disable_tqdm=disable_tqdm), train_dataset=data
    )
    shown = "Caching VAE latents and prompt embeddings (train)" in capsys.readouterr().err
    assert shown is not disable_tqdm
