import io

import torch
from PIL import Image

from fifa_hf.trainer.collator import CachedPairCollator, DiffusionDPOCollator, crop_pair


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def asymmetric_image(width: int = 48, height: int = 40) -> Image.Image:
    """Left half dark, right half bright, a gradient from top to bottom: any flip or crop shows."""
    pixels = torch.zeros(height, width, 3, dtype=torch.uint8)
    pixels[:, width // 2 :] = 200
    pixels += torch.arange(height, dtype=torch.uint8).view(-1, 1, 1)
    return Image.fromarray(pixels.numpy())


def rows(count: int, prompt: str = "a red circle") -> list[dict]:
    image = png(asymmetric_image())
    return [{"prompt": prompt, "chosen": image, "rejected": image, "pair_index": i} for i in range(count)]


def test_both_images_of_a_pair_get_the_same_crop_and_flip():
    collator = DiffusionDPOCollator(resolution=32, random_crop=True, hflip=True, seed=3)
    batch = collator(rows(16))
    assert torch.equal(batch["chosen_pixel_values"], batch["rejected_pixel_values"])
    flipped = batch["chosen_pixel_values"][:, 0, 0, 0] > 0  # the bright half moved to the left
    assert 0 < flipped.sum() < 16
    crops = {tuple(crop) for crop in batch["crop_top_lefts"].tolist()}
    assert len(crops) > 1 and batch["original_sizes"].tolist()[0] == [40, 48]


def test_caption_dropout_empties_about_the_asked_fraction_of_prompts():
    halves = DiffusionDPOCollator(resolution=32, proportion_empty_prompts=0.5), CachedPairCollator(True, 0.5)
    for collator in halves:
        batch = collator(rows(64))
        dropped = [p == "" for p in batch["prompts"]] if "prompts" in batch else batch["drop_prompt"].tolist()
        assert 16 < sum(dropped) < 48
    everything = DiffusionDPOCollator(resolution=32, proportion_empty_prompts=1.0)(rows(4))
    assert everything["prompts"] == [""] * 4
    assert DiffusionDPOCollator(resolution=32)(rows(4))["prompts"] == ["a red circle"] * 4


def test_the_evaluation_collator_is_deterministic():
    collator = DiffusionDPOCollator(resolution=32, hflip=False)
    first, second = collator(rows(8)), collator(rows(8))
    collator.epoch = 5
    assert torch.equal(first["chosen_pixel_values"], second["chosen_pixel_values"])
    assert torch.equal(first["chosen_pixel_values"], collator(rows(8))["chosen_pixel_values"])
    assert (first["chosen_pixel_values"][:, 0, 0, 0] < 0).all()  # never flipped


def test_persistent_dataloader_workers_see_each_new_epoch():
    collator = DiffusionDPOCollator(resolution=32, random_crop=True, seed=0)
    loader = torch.utils.data.DataLoader(
        rows(8), batch_size=8, collate_fn=collator, num_workers=1, persistent_workers=True
    )
    batches = []
    for epoch in range(2):
        collator.epoch = epoch  # what the trainer's callback does at each epoch's start
        batches.append(next(iter(loader)))
    assert not torch.equal(batches[0]["chosen_pixel_values"], batches[1]["chosen_pixel_values"])
    collator.epoch = 0
    assert torch.equal(next(iter(loader))["chosen_pixel_values"], batches[0]["chosen_pixel_values"])


def test_cached_latents_see_the_flips_and_caption_dropout_the_pixel_path_would_draw():
    for options in ({}, {"hflip": True, "proportion_empty_prompts": 0.3, "seed": 7}):
        pixels = DiffusionDPOCollator(resolution=32, **options)
        cached = CachedPairCollator(**options)
        for epoch in (0, 1):
            pixels.epoch = cached.epoch = epoch
            batch, indices = pixels(rows(32)), cached(rows(32))
            flipped = batch["chosen_pixel_values"][:, 0, 0, 0] > 0  # the bright half moved to the left
            assert indices["flip"].tolist() == flipped.tolist() and 0 < flipped.sum() < 32
            assert indices["drop_prompt"].tolist() == [prompt == "" for prompt in batch["prompts"]]
            assert indices["pair_index"].tolist() == list(range(32))
        assert not options or 0 < sum(indices["drop_prompt"].tolist()) < 32


def coordinates(width: int, height: int) -> Image.Image:
    """Red = 5 x column, green = 5 x row: a crop's pixels say where it came from."""
    x, y = torch.meshgrid(torch.arange(width), torch.arange(height), indexing="xy")
    pixels = torch.stack([x * 5, y * 5, torch.zeros_like(x)], dim=-1).to(torch.uint8)
    return Image.fromarray(pixels.numpy())


def column_row(tensor: torch.Tensor, row: int = 0, column: int = 0) -> tuple[int, int]:
    """The source (column, row) of one pixel of a [-1, 1] tensor cut from ``coordinates``."""
    red, green = ((tensor[:2, row, column] + 1) * 127.5 / 5).round().int().tolist()
    return red, green


def test_pixels_are_scaled_to_minus_one_one_as_the_vae_expects():
    black, white = Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8), (255, 255, 255))
    low, high, _, _ = crop_pair(black, white, 8, random_crop=False, flip=False)
    assert low.dtype == high.dtype == torch.float32 and low.shape == (3, 8, 8)
    assert low.unique().tolist() == [-1.0] and high.unique().tolist() == [1.0]


def test_center_crops_of_wide_and_tall_images_and_where_a_flipped_crop_sits():
    wide, tall = coordinates(48, 40), coordinates(40, 48)
    chosen, _, size, crop = crop_pair(wide, wide, 40, random_crop=False, flip=False)
    assert (size, crop, column_row(chosen)) == ((40, 48), (0, 4), (4, 0))
    chosen, _, size, crop = crop_pair(tall, tall, 40, random_crop=False, flip=False)
    assert (size, crop, column_row(chosen)) == ((48, 40), (4, 0), (0, 4))
    flipped, _, _, (top, left) = crop_pair(wide, wide, 40, random_crop=False, flip=True)
    assert left == 4 and column_row(flipped) == (43, 0)  # the flipped crop's first column is the source's last
    halved, _, size, crop = crop_pair(coordinates(96, 80), coordinates(96, 80), 40, random_crop=False, flip=False)
    assert size == (80, 96) and crop == (0, 4) and halved.shape == (3, 40, 40)  # scaled to 48 x 40 first


def test_a_rejected_image_of_another_shape_is_cropped_at_the_same_place_never_squashed():
    square, tall = coordinates(40, 40), coordinates(40, 60)  # e.g. a 512 x 512 and a 512 x 768 image
    chosen, rejected, size, crop = crop_pair(square, tall, 40, random_crop=False, flip=False)
    assert (size, crop, column_row(chosen)) == ((40, 40), (0, 0), (0, 0))
    assert column_row(rejected) == (0, 10) and column_row(rejected, row=39) == (0, 49)  # its centre, at full scale
    _, rejected, _, _ = crop_pair(tall, square, 40, random_crop=False, flip=False)
    assert column_row(rejected) == (0, 0) and column_row(rejected, row=39) == (0, 39)  # the whole square, unstretched
    wide, wider = coordinates(48, 40), coordinates(56, 40)  # 8 and 16 columns to spare
    for seed in range(16):  # a random crop: the same relative place
        chosen, rejected, _, (top, left) = crop_pair(
            wide, wider, 40, random_crop=True, flip=False, generator=torch.Generator().manual_seed(seed)
        )
        assert column_row(chosen) == (left, 0) and column_row(rejected) == (2 * left, 0)


def test_random_crops_stay_inside_the_image_cover_it_and_repeat_with_the_generator():
    wide = coordinates(48, 40)
    lefts = []
    for seed in range(64):
        chosen, rejected, _, (top, left) = crop_pair(
            wide, wide, 40, random_crop=True, flip=False, generator=torch.Generator().manual_seed(seed)
        )
        assert top == 0 and column_row(chosen) == (left, 0) and torch.equal(chosen, rejected)
        again = crop_pair(wide, wide, 40, random_crop=True, flip=False, generator=torch.Generator().manual_seed(seed))
        assert again[3] == (top, left)
        lefts.append(left)
    assert set(lefts) == set(range(9))  # every position from 0 to 48 - 40
    tall = coordinates(40, 48)
    tops = {crop_pair(tall, tall, 40, True, False, torch.Generator().manual_seed(s))[3][0] for s in range(64)}
    assert tops == set(range(9))
    collator = DiffusionDPOCollator(resolution=32, random_crop=True, seed=3)
    assert torch.equal(collator(rows(8))["crop_top_lefts"], collator(rows(8))["crop_top_lefts"])
