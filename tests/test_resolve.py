import pytest

from fifa_hf.resolve import ResolutionError, resolve_hub_reference


def test_an_existing_local_directory_is_used_as_it_is(tiny_clip_path):
    assert resolve_hub_reference(tiny_clip_path, "--reward_model") == str(tiny_clip_path)


def test_a_missing_local_path_is_reported_as_a_path_not_as_a_hub_id(tmp_path):
    with pytest.raises(ResolutionError, match=r"--dataset_name: the local path .*missing.* does not exist"):
        resolve_hub_reference(str(tmp_path / "missing"), "--dataset_name", repo_type="dataset")


def test_a_malformed_reference_names_the_flag():
    with pytest.raises(ResolutionError, match="--quality_model: 'not a repo!' is neither"):
        resolve_hub_reference("not a repo!", "--quality_model")


def test_an_uncached_hub_model_without_network_fails_at_once_naming_flag_id_and_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ResolutionError) as error:
        resolve_hub_reference("someone/not-cached-model", "--reward_model")
    message = str(error.value)
    assert "--reward_model" in message and "someone/not-cached-model" in message
    assert "hf download someone/not-cached-model" in message
