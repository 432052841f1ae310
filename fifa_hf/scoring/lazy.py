"""Models that load on first use and are dropped when pickled.

A scorer holding one can then live inside a ``datasets.map`` function: hashing and ``num_proc``
pickle only its settings, and each process loads its own copy.
"""

from __future__ import annotations

from typing import Any

from fifa_hf.progress import quiet_loading


class LazyLoaded:
    """``loaded`` calls ``_load()`` once; pickling keeps the settings and drops what was loaded."""

    _loaded: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_loaded": None}

    @property
    def loaded(self) -> Any:
        if self._loaded is None:
            with quiet_loading(("transformers",)):
                self._loaded = self._load()
        return self._loaded

    def _load(self) -> Any:
        raise NotImplementedError
