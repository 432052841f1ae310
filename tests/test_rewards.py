import io

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

from fifa_hf.data import to_preference_pairs
from fifa_hf.images import ImageDecodeError
from fifa_hf.scoring import CLIPRewardModel, MarginScorer, PrecomputedReward
from fifa_hf.scoring.images import CLIPImageTransform, decode_image
from fifa_hf.scoring.rewards import RewardModel


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
    reward = CLIPRewardModel(str(tiny_clip_path), device="cpu")
    red, blue = reward.score(["a red square"] * 2, [decode_image(jpeg("red")), decode_image(jpeg("blue"))])
    scored = pickapic([1.0, 0.0]).map(MarginScorer(reward), batched=True)  # row 0 prefers jpg_0 (red), row 1 jpg_1
    assert scored["reward_chosen"] == pytest.approx([red, blue], abs=1e-5)
    assert scored["margin"] == pytest.approx([red - blue, blue - red], abs=1e-5)
    absolute = pickapic([1.0, 0.0]).map(MarginScorer(reward, absolute=True), batched=True)
    assert absolute["margin"] == pytest.approx([abs(red - blue)] * 2, abs=1e-5)


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


class ImageArea(RewardModel):
    """A reward model of one's own (the ``RewardModel`` API): the pixels it was shown."""

    image_size = 64
    identity = "image-area"  # what its scores depend on: nothing but the pixels

    def _load(self):
        return None

    def score(self, prompts, images):
        return np.array([image.width * image.height for image in images], dtype=float)


def test_margins_see_each_image_decoded_about_as_large_as_the_reward_models_input():
    pairs = {"prompt": ["a"], "chosen": [jpeg("red", size=512)], "rejected": [jpeg("blue", size=256)]}
    drafted = MarginScorer(ImageArea())(pairs)
    assert (drafted["reward_chosen"], drafted["reward_rejected"]) == ([64 * 64], [64 * 64])
    whole = MarginScorer(ImageArea(), draft=False)(pairs)
    assert (whole["reward_chosen"], whole["margin"]) == ([512 * 512], [512 * 512 - 256 * 256])


def test_precomputed_rewards_with_a_null_or_nan_give_nan_margins_and_the_reason():
    batch = {"prompt": ["a", "b", "c"], "reward_chosen": [3.0, None, 2.0], "reward_rejected": [1.0, 1.0, float("nan")]}
    scored = MarginScorer(PrecomputedReward("score_0", "score_1"))(batch)  # a null arrives from arrow as None
    assert scored["margin_error"] == ["", "missing_reward", "missing_reward"]
    assert scored["margin"][0] == 2.0 and np.isnan(scored["margin"][1:]).all()


class DeviceRecorder(ImageArea):
    """A reward model that notes the device it was asked to score on."""

    def score(self, prompts, images):
        self.scored_on = self.device
        return super().score(prompts, images)


def test_each_map_process_scores_on_its_own_gpu(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # no GPU can exist here
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    pairs = {"prompt": ["a"], "chosen": [jpeg("red")], "rejected": [jpeg("blue")]}
    reward = DeviceRecorder(device="cpu")
    MarginScorer(reward)(pairs, rank=3)  # datasets.map(..., with_rank=True, num_proc=4) passes the rank
    assert reward.scored_on == "cuda:1"
    single = DeviceRecorder(device="cpu")
    MarginScorer(single)(pairs)  # one process: the model stays where it was put
    assert single.scored_on == "cpu"


def encoded(image: Image.Image, format="PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **kwargs)
    return buffer.getvalue()


def png_16bit(values: np.ndarray) -> bytes:
    """A 16-bit PNG (grey or RGB) written by hand: PIL writes 16-bit grey only, and reads it as mode I;16."""
    import struct
    import zlib

    height, width = values.shape[:2]
    rows = b"".join(b"\0" + values[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2 if values.ndim == 3 else 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def test_16_bit_pngs_score_like_their_8_bit_versions(tiny_clip_path):
    rng = np.random.default_rng(0)
    grey, colour = rng.integers(0, 256, (40, 48), dtype=np.uint8), rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    eight = [encoded(Image.fromarray(grey)), encoded(Image.fromarray(colour))]
    sixteen = [png_16bit(grey.astype(np.uint16) * 257), png_16bit(colour.astype(np.uint16) * 257)]
    assert Image.open(io.BytesIO(sixteen[0])).mode == "I;16"  # what PIL's convert("RGB") turns white
    pairs = datasets.Dataset.from_dict({"prompt": ["a", "b"], "chosen": eight, "rejected": eight[::-1]})
    pairs_16 = datasets.Dataset.from_dict({"prompt": ["a", "b"], "chosen": sixteen, "rejected": sixteen[::-1]})
    scorer = MarginScorer(CLIPRewardModel(str(tiny_clip_path), device="cpu"))
    assert pairs_16.map(scorer, batched=True)["margin"] == pytest.approx(pairs.map(scorer, batched=True)["margin"])


def test_decoding_applies_exif_orientation_reduces_every_format_and_refuses_bombs():
    image = Image.new("RGB", (60, 40), "red")
    image.paste((0, 0, 255), (0, 0, 10, 10))  # a blue corner, top left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    for format in ("JPEG", "PNG"):
        upright = decode_image(encoded(image, format, exif=exif.tobytes()))
        assert upright.size == (40, 60) and upright.getpixel((37, 2))[2] > 200  # the blue corner, now top right
    big = encoded(Image.new("RGB", (1200, 900), "green"))
    assert decode_image(big, min_size=224).size == (300, 225)  # reduced right after decoding, sides >= 224
    transparent = decode_image(encoded(Image.new("RGBA", (8, 8), (0, 0, 0, 0))))
    assert transparent.mode == "RGB" and transparent.getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(ImageDecodeError, match="image_too_large: 1200x900 pixels") as error:
        decode_image(big, max_pixels=1_000_000)
    assert error.value.reason == "image_too_large"


def test_undecodable_and_oversized_images_are_marked_with_their_reason(tiny_clip_path):
    huge, fine = encoded(Image.new("RGB", (200, 200), "red")), jpeg("blue")
    pairs = datasets.Dataset.from_dict({"prompt": ["a", "b"], "chosen": [huge, fine], "rejected": [fine, b"junk"]})
    scorer = MarginScorer(CLIPRewardModel(str(tiny_clip_path), device="cpu"), max_pixels=100 * 100)
    scored = pairs.map(scorer, batched=True)
    assert [error.split(":")[0] for error in scored["margin_error"]] == ["image_too_large", "undecodable_image"]


def test_map_function_is_picklable_and_drops_loaded_weights(tiny_clip_path):
    import pickle

    reward = CLIPRewardModel(str(tiny_clip_path), device="cpu")
    reward.score(["a"], [Image.new("RGB", (8, 8))])
    clone = pickle.loads(pickle.dumps(MarginScorer(reward)))
    assert clone.reward_model._loaded is None and reward._loaded is not None


def test_reward_specs_build_each_backend():
    from fifa_hf.scoring.rewards import OpenCLIPRewardModel, load_reward_model
    from fifa_hf.world.true_reward import SyntheticTrueReward

    pickscore = load_reward_model("pickscore", device="cpu")
    assert (pickscore.model_name_or_path, pickscore.processor_name_or_path, pickscore.name) == (
        "yuvalkirstain/PickScore_v1", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "pickscore",
    )  # fmt: skip
    open_clip = load_reward_model("open_clip:ViT-B-32:/models/b32.pt", device="cpu", dtype="float16")
    assert isinstance(open_clip, OpenCLIPRewardModel)
    assert (open_clip.model_name, open_clip.pretrained, open_clip.dtype) == ("ViT-B-32", "/models/b32.pt", "float16")
    assert load_reward_model("open_clip:local-dir:/models/hps").model_name == "local-dir:/models/hps"
    hps = load_reward_model("hpsv2:/models/HPS_v2_compressed.pt")
    assert (hps.model_name, hps.pretrained, hps.name) == ("ViT-H-14", "/models/HPS_v2_compressed.pt", "hpsv2")
    assert isinstance(load_reward_model("synthetic"), SyntheticTrueReward)  # registered as an entry point
    with pytest.raises(ValueError, match=r"Unknown reward 'clip'.*synthetic"):
        load_reward_model("clip")


def test_add_signals_adds_the_three_signals_as_the_readme_shows(tiny_clip_path, tmp_path, synthetic_pickapic):
    from fifa_hf.scoring import HeuristicQualityScorer, ScoreCache, add_signals

    pairs, _ = to_preference_pairs(synthetic_pickapic.select(range(40)))
    reward = CLIPRewardModel(str(tiny_clip_path), device="cpu")
    scored, stats = add_signals(
        pairs,
        reward,
        HeuristicQualityScorer(),
        reward.embed_text,  # any prompt -> vector function embeds for diversity (PromptEmbedder by default)
        cache=ScoreCache(tmp_path / "quality.sqlite"),
    )
    assert {"reward_chosen", "reward_rejected", "margin", "quality", "diversity", "quality_error"} <= set(
        scored.column_names
    )
    assert stats.unique_prompts == len(set(pairs["prompt"])) and stats.quality_scored == stats.unique_prompts
    assert np.allclose(scored["margin"], np.subtract(scored["reward_chosen"], scored["reward_rejected"]))
    assert np.isfinite(scored["diversity"]).all() and stats.skipped == []


def test_a_reward_model_of_ones_own_must_say_what_its_scores_depend_on():
    class Unnamed(RewardModel):  # without `identity`, a changed model would reuse a filter's saved margins
        def _load(self):
            return None

        def score(self, prompts, images):
            return np.zeros(len(images))

    with pytest.raises(TypeError, match="identity"):
        Unnamed()
    assert ImageArea().identity == "image-area"
