import io

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

from fifa_hf.data import to_preference_pairs
from fifa_hf.scoring import CLIPRewardModel, MarginScorer, PrecomputedReward
from fifa_hf.scoring.images import CLIPImageTransform, decode_image


def jpeg(color, size=64) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_pickscore_formula_matches_clip_logits(tiny_clip_path):
    reward = CLIPRewardModel(str(tiny_clip_path), device="cpu")
    prompts = ["a red square", "a blue circle", "a red square"]
    images = [Image.new("RGB", (48, 48), c) for c in ("red", "blue", "green")]
    scores = reward.score(prompts, images)

    model, processor = AutoModel.from_pretrained(tiny_clip_path), AutoProcessor.from_pretrained(tiny_clip_path)
    inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**inputs).logits_per_image.diagonal().numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)


def test_fast_transform_equals_the_clip_image_processor(tiny_clip_path):
    processor = AutoProcessor.from_pretrained(tiny_clip_path).image_processor
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))
        for height, width in [(48, 48), (45, 71), (90, 33), (32, 32)]
    ]
    transform = CLIPImageTransform.from_image_processor(processor)
    expected = processor(images=images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(transform(images), expected, atol=1e-5, rtol=1e-5)


def test_pickscore_defaults_to_the_laion_processor():
    reward = CLIPRewardModel()
    assert reward.model_name_or_path == "yuvalkirstain/PickScore_v1"
    assert reward.processor_name_or_path == "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def pickapic(label_0):
    rows = {
        "caption": ["a red square"] * 2,
        "jpg_0": [jpeg("red")] * 2,
        "jpg_1": [jpeg("blue")] * 2,
        "label_0": label_0,
    }
    return to_preference_pairs(datasets.Dataset.from_dict(rows))[0]


def test_margin_sign_follows_the_label(tiny_clip_path):
    scorer = MarginScorer(CLIPRewardModel(str(tiny_clip_path), device="cpu"))
    agree = pickapic([1.0, 0.0]).map(scorer, batched=True)
    assert agree[0]["margin"] == pytest.approx(-agree[1]["margin"], abs=1e-5)
    assert agree[0]["margin"] == pytest.approx(agree[0]["reward_chosen"] - agree[0]["reward_rejected"])
    absolute = pickapic([1.0, 0.0]).map(MarginScorer(scorer.reward_model, absolute=True), batched=True)
    assert absolute["margin"] == pytest.approx([abs(agree[0]["margin"])] * 2, abs=1e-5)


def test_corrupt_image_gives_nan_and_reason_while_the_rest_is_scored(tiny_clip_path):
    truncated = jpeg("red")[:200]  # header parses, pixels do not
    pairs = datasets.Dataset.from_dict(
        {"prompt": ["a", "b", "c"], "chosen": [jpeg("red"), truncated, jpeg("green")], "rejected": [jpeg("blue")] * 3}
    )
    scored = pairs.map(MarginScorer(CLIPRewardModel(str(tiny_clip_path), device="cpu")), batched=True)
    assert np.isnan(scored[1]["margin"]) and scored[1]["margin_error"].startswith("undecodable_image")
    assert np.isfinite(scored["margin"][0]) and np.isfinite(scored["margin"][2])
    assert scored["margin_error"][0] == scored["margin_error"][2] == ""


def test_precomputed_rewards_are_oriented_with_the_label():
    rows = datasets.Dataset.from_dict(
        {
            "caption": ["a", "b"],
            "jpg_0": [jpeg("red")] * 2,
            "jpg_1": [jpeg("blue")] * 2,
            "label_0": [1.0, 0.0],
            "score_0": [3.0, 3.0],
            "score_1": [1.0, 1.0],
        }
    )
    pairs, _ = to_preference_pairs(rows, reward_columns=("score_0", "score_1"))
    scored = pairs.map(MarginScorer(PrecomputedReward("score_0", "score_1")), batched=True)
    assert scored["margin"] == [2.0, -2.0]
    with pytest.raises(ValueError, match="score_2"):
        to_preference_pairs(rows, reward_columns=("score_0", "score_2"))


def test_draft_mode_decodes_jpeg_at_reduced_size():
    data = jpeg("red", size=512)
    assert decode_image(data).size == (512, 512)
    assert decode_image(data, min_size=224).size == (256, 256)
    assert decode_image(data, min_size=64).size == (64, 64)


def test_map_function_is_picklable_and_drops_loaded_weights(tiny_clip_path):
    import pickle

    reward = CLIPRewardModel(str(tiny_clip_path), device="cpu")
    reward.score(["a"], [Image.new("RGB", (8, 8))])
    clone = pickle.loads(pickle.dumps(MarginScorer(reward)))
    assert clone.reward_model._loaded is None and reward._loaded is not None
