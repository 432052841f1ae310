"""Shared fixtures: tiny local models and a small synthetic Pick-a-Pic, built once per session."""

import os
import tempfile

import pytest

# A private datasets cache per test session: the default cache keys local folders by name, so a
# stale arrow file from another folder with the same name could be read back.
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="fifa-hf-datasets-")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_clip_path(tmp_path_factory):
    from fifa_hf.testing import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip")


@pytest.fixture(scope="session")
def tiny_llm_path(tmp_path_factory):
    from fifa_hf.testing import save_tiny_llm

    return save_tiny_llm(tmp_path_factory.mktemp("models") / "tiny-llm")


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory):
    from fifa_hf.testing import save_tiny_sd

    return save_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory):
    from fifa_hf.testing import save_tiny_sdxl

    return save_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="session")
def synthetic_pickapic():
    from fifa_hf.world.synthetic import make_synthetic_pickapic

    return make_synthetic_pickapic(300, seed=1)
