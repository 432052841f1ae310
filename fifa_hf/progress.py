"""What a long run shows: one progress bar per long step, and fifa-hf's own log messages.

The libraries' own per-call bars are kept quiet: a model load (diffusers' ``Loading pipeline
components``, transformers' ``Loading weights``) is a cheap step, and ``datasets``' bars (map, filter,
parquet writing) around internal steps would repeat the one bar their caller shows with a total and a
clear description.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import import_module


@contextmanager
def quiet_loading(libraries: tuple[str, ...] = ("diffusers", "transformers")) -> Iterator[None]:
    """Silence the bars ``libraries`` draw while loading a model, a cheap step (diffusers' ``Loading pipeline
    components``, transformers' ``Loading weights``); they are restored afterwards if they were on."""
    modules = [import_module(f"{library}.utils.logging") for library in libraries]
    enabled = [(module, module.is_progress_bar_enabled()) for module in modules]
    for module in modules:
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module, was_enabled in enabled:
            if was_enabled:
                module.enable_progress_bar()


@contextmanager
def datasets_bars_disabled() -> Iterator[None]:
    """Silence ``datasets``' progress bars inside the block, restoring the user's setting after it."""
    import datasets

    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


def setup_logging() -> None:
    """Show fifa-hf's own messages (resume counts, rescored rows, warnings) at INFO on stderr; other
    libraries stay at WARNING. Does nothing to a logging setup the caller already made."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if logging.getLogger("fifa_hf").level == logging.NOTSET:
        logging.getLogger("fifa_hf").setLevel(logging.INFO)
