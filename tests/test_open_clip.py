"""open_clip runs for real in a subprocess with the torchvision import shim (see tests/torchvision_shim)."""

import json
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
print(json.dumps({"scores": scores.tolist(), "expected": expected.tolist(), "size": reward.image_size}))
"""


def test_open_clip_reward_matches_open_clips_own_forward(tmp_path):
    if subprocess.run(
        [sys.executable, "-c", "import importlib.util as u; assert u.find_spec('open_clip')"]
    ).returncode:
        pytest.fail("open_clip_torch is not installed: README's test command installs it with --no-deps")
    env = {"PYTHONPATH": str(SHIM), "HF_HUB_OFFLINE": "1"}
    import os

    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, env={**os.environ, **env}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["size"] == 32
    assert out["scores"] == pytest.approx(out["expected"], abs=1e-4)
