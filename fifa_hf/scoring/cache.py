"""A persistent prompt-score cache, so a re-run or an interrupted run never asks again.

One SQLite file keyed by (scorer identity, SHA-256 of the prompt). Only successful (finite) scores
are stored, and ``put_many`` refuses anything else; a prompt that failed is asked again on the next run.
"""

from __future__ import annotations

import hashlib
import math
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


class ScoreCache:
    """``get_many``/``put_many`` of float scores per (scorer, prompt); safe across threads and processes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        with self._connect() as connection:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute(
                "CREATE TABLE IF NOT EXISTS scores (scorer TEXT, prompt_hash TEXT, score REAL, "
                "PRIMARY KEY (scorer, prompt_hash))"
            )

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        connection = sqlite3.connect(self.path, timeout=60)
        try:
            with connection:  # commits on success
                yield connection
        finally:
            connection.close()

    def get_many(self, scorer: str, prompts: Iterable[str]) -> dict[str, float]:
        by_hash = {prompt_hash(p): p for p in prompts}
        found: dict[str, float] = {}
        hashes = list(by_hash)
        with self._lock, self._connect() as connection:
            for start in range(0, len(hashes), 500):
                chunk = hashes[start : start + 500]
                query = f"SELECT prompt_hash, score FROM scores WHERE scorer = ? AND prompt_hash IN ({','.join('?' * len(chunk))})"
                for key, score in connection.execute(query, [scorer, *chunk]):
                    found[by_hash[key]] = score
        return found

    def put_many(self, scorer: str, scores: dict[str, float]) -> None:
        failed = [prompt for prompt, score in scores.items() if not math.isfinite(score)]
        if failed:
            raise ValueError(f"Only scores can be cached, not failures: {len(failed)} non-finite, e.g. {failed[0]!r}.")
        rows = [(scorer, prompt_hash(p), float(s)) for p, s in scores.items()]
        with self._lock, self._connect() as connection:
            connection.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?, ?)", rows)

    def __len__(self) -> int:
        with self._connect() as connection:
            return connection.execute("SELECT COUNT(*) FROM scores").fetchone()[0]
