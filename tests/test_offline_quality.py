import csv
import pickle
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from fifa_hf.filter import FiFAConfig
from fifa_hf.scoring import OfflineQualityScorer
from fifa_hf.scoring.builders import ResolvedModels, build_quality_scorer
from fifa_hf.scoring.offline_quality import (
    HARM_DESCRIPTIONS,
    bundled_reference_prompts,
    embedding_key,
    packaged_minilm_tag,
    read_lexicon,
)

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def scorer():
    return OfflineQualityScorer()


def labelled(name: str) -> tuple[list[str], np.ndarray]:
    with open(DATA / f"quality_prompts_{name}.tsv", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [row["prompt"] for row in rows], np.array([row["label"] for row in rows])


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a random positive scores above a random negative), ties counting half."""
    return mannwhitneyu(positive, negative).statistic / (len(positive) * len(negative))


def test_separates_clean_from_junk_and_unsafe_prompts_it_was_never_tuned_on(scorer):
    # The held-out set was written before the scorer and never used to set it (README, "Offline quality").
    prompts, labels = labelled("heldout")
    result = scorer(prompts)
    quality = np.array([result.scores[p] for p in prompts])
    assert result.num_scored == len(set(prompts)) and not result.errors
    assert ((quality >= 0) & (quality <= 1)).all()
    clean = quality[labels == "clean"]
    assert auc(clean, quality[labels == "junk"]) >= 0.97
    assert auc(clean, quality[labels == "unsafe"]) >= 0.90


def test_evidence_names_the_harm_and_keeps_benign_lookalikes_clean(scorer):
    evidence = scorer.evidence(
        [
            "a nude portrait on a bed",
            "a decapitated knight, gory",
            "a swastika flag",
            "a glass of blood orange juice",
            "a comic strip about a cat",
            "a fashion photo shoot on the beach",
            "asdf jkl",
            "a lighthouse on a rocky shore at dusk",
        ]
    ).set_index("prompt")
    assert evidence["harm_category"].tolist()[:3] == ["nudity", "gore", "hate"]
    assert (evidence["quality"].iloc[:3] == 0).all()
    assert (evidence["harm_term"].iloc[3:] == "").all()
    assert evidence.loc["asdf jkl", "content_words"] == 0 and evidence.loc["asdf jkl", "quality"] == 0
    lighthouse = evidence.loc["a lighthouse on a rocky shore at dusk"]
    assert lighthouse["quality"] > 0.8 and lighthouse["content_words"] >= 3


def test_shipped_reference_embeddings_are_the_packaged_models(scorer):
    shipped = np.load(Path(__file__).parents[1] / "fifa_hf" / "resources" / "offline_quality_embeddings.npz")
    tag = packaged_minilm_tag()
    for texts in (bundled_reference_prompts(), HARM_DESCRIPTIONS):
        stored = shipped[embedding_key(tag, texts)].astype(np.float32)
        assert stored.shape == (len(texts), 384)
        fresh = scorer.embedder(list(texts[:16]))
        np.testing.assert_allclose(stored[:16], fresh, atol=2e-3)


def test_is_the_offline_choice_of_the_filter_and_pickles_without_its_model(scorer):
    config = FiFAConfig(quality_scorer="offline", method="setwise", alpha=0)
    built = build_quality_scorer(config, ResolvedModels())
    assert isinstance(built, OfflineQualityScorer) and built.identity == scorer.identity
    scorer.evidence(["a red fox in the snow"])
    copy = pickle.loads(pickle.dumps(scorer))
    assert copy._loaded is None and copy.embedder._loaded is None and copy.identity == scorer.identity


def test_lexicon_lines_must_name_a_category(tmp_path):
    path = tmp_path / "lexicon.tsv"
    path.write_text("# comment\nsexual\tporn*\nno category here\n")
    with pytest.raises(ValueError, match="lexicon.tsv:3"):
        read_lexicon(path)


def test_its_identity_follows_the_weights_of_a_custom_embedding_model(tmp_path):
    model = tmp_path / "my-minilm"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    before = OfflineQualityScorer(embedding_model=str(model)).identity
    (model / "model.safetensors").write_bytes(b"weights, retrained in place")
    assert OfflineQualityScorer(embedding_model=str(model)).identity != before  # cached scores are not reused


def test_scoring_in_batches_shows_one_bar_with_the_total(scorer, capfd, monkeypatch):
    monkeypatch.setattr(scorer, "batch_size", 2)
    scorer(["a red cat on a sofa", "a blue dog", "xx qq", "an old man reading a book", "a sunset over the sea"])
    shown = capfd.readouterr().err
    assert "Scoring prompt quality (offline)" in shown and "5/5" in shown and "Embedding prompts" not in shown
