import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

from fifa_hf.trainer.lean_lora import lean_lora_forwards, plain_lora_linears


def adapted(**lora) -> torch.nn.Module:
    """A LoRA (alpha = 3r, both matrices random) on the first of two projections."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.SiLU(), torch.nn.Linear(5, 3))
    config = LoraConfig(r=2, lora_alpha=6, target_modules=["0"], init_lora_weights=False, **lora)
    return inject_adapter_in_model(config, model)


def outputs_and_gradients(model: torch.nn.Module, x: torch.Tensor, autocast: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        output = model(x)
    output.float().square().sum().backward()
    gradients = [p.grad.clone() for p in (x, *model.parameters()) if p.grad is not None]  # input and adapter
    model.zero_grad()
    x.grad = None
    return output, gradients


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast", "bf16-weights-fp32-lora"])
def test_the_lean_forward_computes_peft_s_outputs_and_gradients_bit_for_bit(precision):
    model, x = adapted(), torch.randn(4, 6)
    if precision == "bf16-weights-fp32-lora":  # a pipeline loaded in bf16: the adapter trains in fp32
        model.to(torch.bfloat16)
        for name, parameter in model.named_parameters():
            parameter.data = parameter.data.float() if "lora_" in name else parameter.data
        x = x.bfloat16()
    x.requires_grad_(True)
    layers = plain_lora_linears(model.modules())
    assert [layer for layer, _ in layers] == [model[0]]
    expected = outputs_and_gradients(model, x, autocast=precision == "bf16-autocast")
    with lean_lora_forwards(layers):
        lean = outputs_and_gradients(model, x, autocast=precision == "bf16-autocast")
        model[0]._disable_adapters = True  # as for the reference forward: the base layer alone
        assert torch.equal(model[0](x), model[0].base_layer(x))
        model[0]._disable_adapters = False
    assert lean[0].dtype == expected[0].dtype and torch.equal(lean[0], expected[0])
    assert len(lean[1]) == len(expected[1]) == 3 and all(torch.equal(a, b) for a, b in zip(lean[1], expected[1]))
    assert "forward" not in model[0].__dict__  # peft's own forward again


def test_layers_with_dropout_or_a_variant_keep_peft_s_forward():
    assert plain_lora_linears(adapted(lora_dropout=0.1).modules()) == []
    assert plain_lora_linears(adapted(use_dora=True).modules()) == []


def test_merged_weights_go_through_peft():
    model, x = adapted(), torch.randn(4, 6)
    expected = model(x)
    layers = plain_lora_linears(model.modules())
    model[0].merge()
    with lean_lora_forwards(layers):
        merged = model(x)
    assert torch.allclose(merged, expected, atol=1e-6)  # not base + delta on merged weights (twice the adapter)
