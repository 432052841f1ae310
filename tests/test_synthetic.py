import io

import numpy as np
from PIL import Image

from fifa_hf.world.synthetic import Attributes, bradley_terry_probability, make_synthetic_pickapic, render


def test_columns_and_determinism(synthetic_pickapic):
    expected = {"caption", "jpg_0", "jpg_1", "label_0", "label_1", "has_label", "are_different"}
    assert expected | {"true_reward_0", "true_reward_1"} <= set(synthetic_pickapic.column_names)
    assert len(synthetic_pickapic) == 300
    again = make_synthetic_pickapic(300, seed=1)
    assert again["caption"] == synthetic_pickapic["caption"] and again["jpg_0"][:5] == synthetic_pickapic["jpg_0"][:5]
    assert make_synthetic_pickapic(300, seed=2)["caption"] != synthetic_pickapic["caption"]
    image = Image.open(io.BytesIO(synthetic_pickapic[0]["jpg_0"]))
    assert image.format == "JPEG" and image.size == (64, 64)


def test_prompts_repeat_and_include_junk_and_unsafe():
    data = make_synthetic_pickapic(1400, seed=0, junk_fraction=0.2, unsafe_fraction=0.1)
    pairs_per_prompt = len(data) / len(set(data["caption"]))
    assert 10 <= pairs_per_prompt <= 18
    kinds = np.array(data["prompt_kind"])
    assert 0.1 < (kinds == "junk").mean() < 0.3 and 0.03 < (kinds == "unsafe").mean() < 0.2


def test_labels_agree_with_true_reward_at_the_rate_the_noise_implies():
    for temperature in (0.05, 0.3):
        data = make_synthetic_pickapic(3000, seed=3, label_temperature=temperature, image_size=16)
        r0, r1, label = (np.array(data[c]) for c in ("true_reward_0", "true_reward_1", "label_0"))
        decided = (label != 0.5) & (r0 != r1)
        agree = ((label == 1) == (r0 > r1))[decided].mean()
        expected = bradley_terry_probability(np.abs(r0 - r1), 0, temperature)[decided].mean()
        assert abs(agree - expected) < 0.03, (temperature, agree, expected)
    assert abs((label == 0.5).mean() - 0.05) < 0.015


def test_true_reward_is_attribute_match():
    target = Attributes(count=2, color="red", shape="circle", background="white", style="filled")
    assert target.match(target) == 1.0
    assert target.match(Attributes(2, "blue", "circle", "white", "outlined")) == 0.6
    assert render(target, 32).getpixel((0, 0)) == (250, 250, 250)


def test_harm_marker_is_read_back_from_the_rendered_images():
    from fifa_hf.world.true_reward import read_attributes, shows_harm

    data = make_synthetic_pickapic(240, seed=4, junk_fraction=0.1, unsafe_fraction=0.4)
    kinds = np.array(data["prompt_kind"])
    for index in "01":
        harm = np.array(data[f"harm_{index}"])
        read = np.array([shows_harm(Image.open(io.BytesIO(jpg))) for jpg in data[f"jpg_{index}"]])
        assert (read == harm).all()  # from JPEG pixels, for every image
        assert not harm[kinds != "unsafe"].any() and 0.3 < harm[kinds == "unsafe"].mean() < 0.7
    assert make_synthetic_pickapic(100, seed=4, unsafe_fraction=0.5, harm_probability=0.0)["harm_0"] == [False] * 100
    target = Attributes(count=3, color="purple", shape="triangle", background="black", style="outlined")
    framed, plain = render(target, 64, harm=True), render(target, 64)
    assert shows_harm(framed) and not shows_harm(plain)
    assert read_attributes(framed) == read_attributes(plain) == {
        "count": 3, "color": "purple", "shape": "triangle", "background": "black", "style": "outlined"
    }  # fmt: skip
