"""Progress reporting: one bar per long step, and the libraries' own per-call bars kept quiet."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence the bars diffusers (``Loading pipeline components``) and transformers (``Loading weights``)
    draw while loading a model, a cheap step; they are restored afterwards if they were on."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    enabled = [(module, module.is_progress_bar_enabled()) for module in (diffusers_logging, transformers_logging)]
    for module, _ in enabled:
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module, was_enabled in enabled:
            if was_enabled:
                module.enable_progress_bar()
