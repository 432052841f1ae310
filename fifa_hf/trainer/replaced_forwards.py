"""Module forwards replaced for the length of a block, then each module's own again."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch


@contextlib.contextmanager
def replaced_forwards(
    modules: list[torch.nn.Module], replacement: Callable[[torch.nn.Module, Callable], Callable]
) -> Iterator[None]:
    """Inside, each module's forward is ``replacement(module, its forward)``. Afterwards it is its class's forward
    again, or the forward an instance already had; no closure stays on the module (where a deepcopy or a pickle of
    the model would pick it up)."""
    own_forwards = [module.__dict__.get("forward") for module in modules]
    for module in modules:
        module.forward = replacement(module, module.forward)
    try:
        yield
    finally:
        for module, forward in zip(modules, own_forwards):
            if forward is None:
                del module.forward
            else:
                module.forward = forward
