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


@pytest.mark.parametrize("repo_id, folder", [("org/pairs", "datasets--org--pairs"), ("imdb", "datasets--imdb")])
def test_a_hub_dataset_resolves_to_the_commit_of_its_revision_from_the_cache(tmp_path, monkeypatch, repo_id, folder):
    import huggingface_hub

    from fifa_hf.resolve import hub_dataset_commit

    repo = tmp_path / folder
    for commit in ("1" * 40, "2" * 40):
        (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("2" * 40)
    (repo / "refs" / "v1").write_text("1" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert hub_dataset_commit(repo_id, "--dataset_name") == "2" * 40  # an id without an owner too
    assert hub_dataset_commit(repo_id, "--dataset_name", "v1") == "1" * 40
    assert hub_dataset_commit(str(tmp_path), "--dataset_name") is None  # a local dataset has no commit
