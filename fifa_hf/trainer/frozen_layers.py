"""Which layers of a LoRA UNet are frozen, as whole submodules."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from peft.tuners.tuners_utils import BaseTunerLayer


@dataclass
class FrozenLayers:
    """``layers``: the largest submodules without an adapter, a trained weight or an active dropout (they compute the
    same whatever the adapters do); ``boundaries``: the adapters, trained modules and dropouts between them."""

    layers: list[torch.nn.Module] = field(default_factory=list)
    boundaries: list[torch.nn.Module] = field(default_factory=list)


def _has_dropout(module: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in module.modules())


def _is_frozen(module: torch.nn.Module) -> bool:
    adapted = any(isinstance(m, BaseTunerLayer) for m in module.modules())
    return not adapted and not any(p.requires_grad for p in module.parameters())


def find_frozen_layers(model: torch.nn.Module, found: FrozenLayers | None = None) -> FrozenLayers:
    found = FrozenLayers() if found is None else found
    for child in model.children():
        trained = any(p.requires_grad for p in child.parameters(recurse=False))
        if isinstance(child, BaseTunerLayer) or trained or _has_dropout(child):
            found.boundaries.append(child)
        elif not _is_frozen(child) or isinstance(child, (torch.nn.ModuleList, torch.nn.ModuleDict)):
            find_frozen_layers(child, found)  # containers are not called, their members are
        else:
            found.layers.append(child)
    return found
