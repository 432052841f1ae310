"""open_clip runs for real in a subprocess with the torchvision import shim (see tests/torchvision_shim)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SHIM = Path(__file__).parent / "torchvision_shim"

SCRIPT = r"""
import json, sys
import numpy as np, torch
from PIL import Image
import open_clip
from safetensors.torch import save_file
from fifa_hf.scoring import OpenCLIPRewardModel

directory = sys.argv[1]
config = {
    "model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    },
    "preprocess_cfg": {"size": 32, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "interpolation": "bicubic"},
}
json.dump(config, open(directory + "/open_clip_config.json", "w"))
torch.manual_seed(0)
model = open_clip.create_model("local-dir:" + directory)
save_file(model.state_dict(), directory + "/open_clip_model.safetensors")

reward = OpenCLIPRewardModel("local-dir:" + directory, device="cpu", name="hps")
prompts = ["a red square", "a blue circle"]
images = [Image.new("RGB", (48, 40), (255, 0, 0)), Image.new("RGB", (40, 48), (0, 0, 255))]
scores = reward.score(prompts, images)

pixels = reward.loaded[2](images)
expected_red = (np.array([1.0, 0.0, 0.0]) - [0.5, 0.4, 0.3]) / [0.2, 0.25, 0.3]
assert pixels.shape == (2, 3, 32, 32), pixels.shape
assert np.allclose(pixels[0, :, 16, 16].numpy(), expected_red, atol=1e-5)
loaded = open_clip.create_model("local-dir:" + directory).eval()
with torch.no_grad():
    image_features, text_features, scale = loaded(pixels, open_clip.get_tokenizer("local-dir:" + directory)(prompts))
expected = (scale * (image_features * text_features).sum(-1)).numpy()

# `--reward open_clip:local-dir:<dir>` as `fifa-hf evaluate` reads it: parsed, resolved, then scoring images.
from fifa_hf.evaluation import Generation, score
from fifa_hf.resolve import ResolutionError
from fifa_hf.scoring.rewards import load_reward_model

generations = []
for index, (prompt, image) in enumerate(zip(prompts, images)):
    image.save(f"{directory}/{index}.png")
    generations.append(Generation(prompt, index, 0, 0, f"{directory}/{index}.png"))
from_spec = load_reward_model("open_clip:local-dir:" + directory, device="cpu")
from_spec.resolve("--reward")
evaluated = score(generations, [from_spec])
errors = {}
for spec in ("open_clip:local-dir:/no/such/dir", "open_clip:NoSuchArch", "open_clip:ViT-B-32:no_such_tag",
             "open_clip:ViT-B-32:laion2b_s34b_b79k", "hpsv2:/no/such/HPS_v2_compressed.pt"):
    try:
        load_reward_model(spec, device="cpu").resolve("--reward")
    except ResolutionError as error:
        errors[spec] = str(error)
print(json.dumps({"scores": scores.tolist(), "expected": expected.tolist(), "size": reward.image_size,
                  "name": directory.rstrip("/").rsplit("/", 1)[-1], "evaluated": {k: v.tolist() for k, v in evaluated.items()},
                  "errors": errors}))
"""


@pytest.fixture(scope="module")
def open_clip_run(tmp_path_factory):
    """One subprocess (open_clip imports torchvision, so it runs with the shim) for every open_clip check."""
    if subprocess.run(
        [sys.executable, "-c", "import importlib.util as u; assert u.find_spec('open_clip')"]
    ).returncode:
        pytest.fail("open_clip_torch is not installed: README's test command installs it with --no-deps")
    env = {**os.environ, "PYTHONPATH": str(SHIM), "HF_HUB_OFFLINE": "1"}
    directory = tmp_path_factory.mktemp("open-clip")
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(directory)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_open_clip_reward_matches_open_clips_own_forward(open_clip_run):
    assert open_clip_run["size"] == 32
    assert open_clip_run["scores"] == pytest.approx(open_clip_run["expected"], abs=1e-4)


def test_an_open_clip_spec_scores_as_the_model_does(open_clip_run):
    name = open_clip_run["name"]  # the reward is named after the model's directory
    assert list(open_clip_run["evaluated"]) == [name]
    assert open_clip_run["evaluated"][name] == pytest.approx(open_clip_run["scores"], abs=1e-5)


def test_open_clip_specs_that_cannot_load_fail_before_any_work(open_clip_run):
    errors = open_clip_run["errors"]
    assert "--reward: the local path '/no/such/dir' does not exist" in errors["open_clip:local-dir:/no/such/dir"]
    assert "'NoSuchArch' is not an open_clip architecture" in errors["open_clip:NoSuchArch"]
    assert "neither a checkpoint file nor a pretrained tag of ViT-B-32" in errors["open_clip:ViT-B-32:no_such_tag"]
    # A known tag is fetched from its Hub repo before scoring; offline and uncached, that fails at once.
    assert (
        "the Hub model 'laion/CLIP-ViT-B-32-laion2B-s34B-b79K' cannot be downloaded"
        in (errors["open_clip:ViT-B-32:laion2b_s34b_b79k"])
    )
    assert (
        "the local path '/no/such/HPS_v2_compressed.pt' does not exist"
        in errors["hpsv2:/no/such/HPS_v2_compressed.pt"]
    )
