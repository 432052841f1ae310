"""pytest plugin for mutmut's runs (setup.cfg ``[mutmut] pytest_add_cli_args``): a datasets cache per run.

mutmut forks every mutant's test run from one process that imported ``tests/conftest.py`` once, so
the runs would share its datasets cache; a ``map`` result cached under one mutant (its fingerprint
cannot see which mutant is active) would be read back under the next one.
"""

import os
import shutil
import tempfile
from pathlib import Path

_cache: Path | None = None


def pytest_configure(config):
    global _cache
    import datasets

    _cache = Path(tempfile.mkdtemp(prefix="fifa-hf-mutant-datasets-"))
    datasets.config.HF_DATASETS_CACHE = _cache
    os.environ["HF_DATASETS_CACHE"] = str(_cache)  # for the commands the tests run in subprocesses


def pytest_unconfigure(config):
    if _cache is not None:
        shutil.rmtree(_cache, ignore_errors=True)
