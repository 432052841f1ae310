import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

from fifa_hf.trainer.frozen_layers import find_frozen_layers
from fifa_hf.trainer.shared_prefix import SharedFrozenPrefix


class Tiny(torch.nn.Module):
    """A frozen embedding, then an adapted projection: the embedding is what a policy and its reference share."""

    def __init__(self, in_place: bool = False):
        super().__init__()
        self.embed, self.proj, self.in_place = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), in_place

    def forward(self, x):
        h = self.embed(x)
        return self.proj(h.mul_(2) if self.in_place else h * 2)


def adapted(in_place: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    model = inject_adapter_in_model(
        LoraConfig(r=2, target_modules=["proj"], init_lora_weights="gaussian"), Tiny(in_place)
    )
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("lora_" in name)
    return model


def test_the_second_forward_reuses_the_frozen_layers_before_the_first_adapter():
    model, x = adapted(), torch.randn(3, 4)
    expected = model(x)
    prefix = SharedFrozenPrefix(model, find_frozen_layers(model))
    with prefix.shared():
        with torch.no_grad():
            first = model(x)
        second = model(x)
    assert prefix.reused == 1 and torch.equal(first, expected) and torch.equal(second, expected)
    second.sum().backward()  # gradients reach the adapter through the reused output
    assert model.proj.lora_B["default"].weight.grad.abs().sum() > 0
    assert model.forward == Tiny.forward.__get__(model) and "forward" not in model.embed.__dict__


@pytest.mark.parametrize("case", ["changed in place", "inputs need gradients", "trained layer"])
def test_an_output_is_computed_afresh_when_reusing_it_could_differ(case):
    model, x = adapted(in_place=case == "changed in place"), torch.randn(3, 4)
    if case == "trained layer":
        model.embed.weight.requires_grad_(True)
    expected = model(x.clone())
    prefix = SharedFrozenPrefix(model, find_frozen_layers(model))
    with prefix.shared():
        model(x.clone())
        second = model(x.clone().requires_grad_(case == "inputs need gradients"))
    assert prefix.reused == 0 and torch.allclose(second, expected)
