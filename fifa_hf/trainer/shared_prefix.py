"""The layers a LoRA policy shares with its reference, computed once a step instead of twice."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from fifa_hf.trainer.frozen_layers import FrozenLayers
from fifa_hf.trainer.replaced_forwards import replaced_forwards


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _versions(value: Any) -> list[int]:
    """Each tensor's in-place modification counter: a recorded output changed since is not reused."""
    return [tensor._version for tensor in _tensors(value)]


class SharedFrozenPrefix:
    """With LoRA the reference is the policy's own UNet with its adapters off, so every layer that runs before the
    first adapter (or trained weight) gets the same inputs in both forwards and gives the same outputs: the time
    embedding, ``conv_in`` and the first resnet (SD1.5), or the whole first down block at the highest resolution
    (SDXL, whose first block has no attention, and the tiny test UNets). Inside ``shared()`` the first UNet forward
    records those layers' outputs and the second reuses them instead of computing them again.

    Exact by construction: the layers reused are whole frozen submodules without adapters or dropout, called before
    any adapter or trained weight has run; an output changed in place since it was recorded, or a call whose inputs
    need gradients, is computed afresh."""

    def __init__(self, unet: torch.nn.Module, frozen: FrozenLayers):
        self.unet = unet
        self._layers, self._boundaries = frozen.layers, frozen.boundaries
        self._outputs: dict[torch.nn.Module, list[tuple[Any, list[int]]]] = {}
        self._forward_index = 0
        self._before_boundary = False
        self.reused = 0  # layer outputs reused so far (a count for tests and profiles)

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        """The first UNet forward inside records the shared layers' outputs; the second reuses them."""
        handles = [self.unet.register_forward_pre_hook(self._start_forward)]
        handles += [module.register_forward_pre_hook(self._reach_boundary) for module in self._boundaries]
        try:
            with replaced_forwards(self._layers, self._shared_forward):
                yield
        finally:
            for handle in handles:
                handle.remove()
            self._outputs.clear()
            self._forward_index, self._before_boundary = 0, False

    def _start_forward(self, module: torch.nn.Module, args: Any) -> None:
        self._forward_index += 1
        self._before_boundary = True

    def _reach_boundary(self, module: torch.nn.Module, args: Any) -> None:
        self._before_boundary = False

    def _shared_forward(self, module: torch.nn.Module, forward: Callable) -> Callable:
        def shared_forward(*args, **kwargs):
            if not self._before_boundary or self._forward_index > 2:
                return forward(*args, **kwargs)
            if self._forward_index == 1:
                output = forward(*args, **kwargs)
                self._outputs.setdefault(module, []).append((output, _versions(output)))
                return output
            recorded = self._outputs.get(module)
            if recorded:
                output, versions = recorded.pop(0)
                inputs_need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in _tensors((args, kwargs)))
                if not inputs_need_grad and _versions(output) == versions:
                    self.reused += 1
                    return output
            return forward(*args, **kwargs)

        return shared_forward
