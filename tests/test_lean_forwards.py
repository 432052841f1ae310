import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from peft import LoraConfig, inject_adapter_in_model

from fifa_hf.trainer.lean_forwards import LeanAttnProcessor, lean_forwards, plain_attentions, plain_lora_linears


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


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast", "bf16-weights-fp32-lora", "fp32-lora-bias"])
def test_the_lean_forward_computes_peft_s_outputs_and_gradients_bit_for_bit(precision):
    model, x = adapted(lora_bias=precision.endswith("lora-bias")), torch.randn(4, 6)
    if precision.endswith("lora-bias"):
        torch.nn.init.normal_(model[0].lora_B["default"].bias)
    if precision == "bf16-weights-fp32-lora":  # a pipeline loaded in bf16: the adapter trains in fp32
        model.to(torch.bfloat16)
        for name, parameter in model.named_parameters():
            parameter.data = parameter.data.float() if "lora_" in name else parameter.data
        x = x.bfloat16()
    x.requires_grad_(True)
    layers = plain_lora_linears(model.modules())
    assert [layer for layer, _ in layers] == [model[0]]
    expected = outputs_and_gradients(model, x, autocast=precision == "bf16-autocast")
    with lean_forwards(layers, []):
        lean = outputs_and_gradients(model, x, autocast=precision == "bf16-autocast")
        model[0]._disable_adapters = True  # as for the reference forward: the base layer alone
        assert torch.equal(model[0](x), model[0].base_layer(x))
        model[0]._disable_adapters = False
    assert lean[0].dtype == expected[0].dtype and torch.equal(lean[0], expected[0])
    assert len(lean[1]) == len(expected[1]) == (4 if precision.endswith("lora-bias") else 3) and all(
        torch.equal(a, b) for a, b in zip(lean[1], expected[1])
    )
    assert "forward" not in model[0].__dict__  # peft's own forward again


def test_layers_with_dropout_or_a_variant_keep_peft_s_forward():
    assert plain_lora_linears(adapted(lora_dropout=0.1).modules()) == []
    assert plain_lora_linears(adapted(use_dora=True).modules()) == []


def test_merged_weights_go_through_peft():
    model, x = adapted(), torch.randn(4, 6)
    expected = model(x)
    layers = plain_lora_linears(model.modules())
    model[0].merge()
    with lean_forwards(layers, []):
        merged = model(x)
    assert torch.allclose(merged, expected, atol=1e-6)  # not base + delta on merged weights (twice the adapter)


def attention(**kwargs) -> Attention:
    torch.manual_seed(0)
    return Attention(**{"query_dim": 8, "heads": 2, "dim_head": 4, **kwargs})


@pytest.mark.parametrize("kind", ["self-attention", "cross-attention", "masked (diffusers' processor)"])
def test_the_lean_attention_computes_diffusers_outputs_and_gradients_bit_for_bit(kind):
    layer = attention(cross_attention_dim=None if kind == "self-attention" else 6)
    x = torch.randn(2, 5, 8, requires_grad=True)
    context = None if kind == "self-attention" else torch.randn(2, 3, 6)
    mask = torch.tensor([[True, True, False], [True, False, False]]) if kind.startswith("masked") else None
    assert plain_attentions(layer.modules()) == [layer]

    def outputs_and_gradients():
        output = layer(x, encoder_hidden_states=context, attention_mask=mask)
        output.square().sum().backward()
        gradients = [x.grad.clone(), *(p.grad.clone() for p in layer.parameters())]
        layer.zero_grad()
        x.grad = None
        return output, gradients

    expected = outputs_and_gradients()
    with lean_forwards([], [layer]):
        assert isinstance(layer.processor, LeanAttnProcessor)
        lean = outputs_and_gradients()
    assert torch.equal(lean[0], expected[0]) and all(torch.equal(a, b) for a, b in zip(lean[1], expected[1]))
    assert type(layer.processor) is AttnProcessor2_0


@pytest.mark.parametrize(
    "kwargs, without",
    [
        (dict(residual_connection=True), None),
        (dict(rescale_output_factor=2.0), None),
        (dict(dropout=0.1), None),
        (dict(qk_norm="layer_norm"), "norm_k"),
        (dict(qk_norm="layer_norm"), "norm_q"),
        (dict(norm_num_groups=2), None),
        (dict(query_dim=32, spatial_norm_dim=4), None),
        (dict(cross_attention_dim=6, cross_attention_norm="layer_norm"), None),
        (dict(processor=AttnProcessor()), None),
    ],
    ids=[
        "residual",
        "rescaled",
        "dropout",
        "query-norm",
        "key-norm",
        "group-norm",
        "spatial-norm",
        "cross-norm",
        "math",
    ],
)
def test_attentions_that_do_more_keep_diffusers_processor(kwargs, without):
    layer = attention(**kwargs)
    if without:
        setattr(layer, without, None)
    assert plain_attentions(layer.modules()) == []


def test_a_processor_set_after_the_layers_were_chosen_is_kept():
    layer = attention()
    attentions = plain_attentions(layer.modules())
    layer.set_processor(AttnProcessor())
    with lean_forwards([], attentions):
        assert type(layer.processor) is AttnProcessor
