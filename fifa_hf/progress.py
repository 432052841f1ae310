"""Progress reporting: one bar per long step, and the libraries' own per-call bars kept quiet."""

from __future__ import annotations

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
