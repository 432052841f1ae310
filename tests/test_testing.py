import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from transformers import AutoModel, AutoModelForCausalLM, AutoProcessor, AutoTokenizer


def test_tiny_clip_loads_like_pickscore(tiny_clip_path):
    model = AutoModel.from_pretrained(tiny_clip_path)
    processor = AutoProcessor.from_pretrained(tiny_clip_path)
    inputs = processor(text=["a red cube"], images=[Image.new("RGB", (40, 40))], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits_per_image.shape == (1, 1)


def test_tiny_llm_has_a_chat_template_and_single_digit_tokens(tiny_llm_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llm_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_llm_path)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|assistant|>")
    digits = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    assert len(set(digits)) == 10 and tokenizer.unk_token_id not in digits
    logits = model(**tokenizer([text], return_tensors="pt")).logits
    assert logits.shape[-1] == len(tokenizer)


def test_tiny_pipelines_round_trip_and_generate(tiny_sd_path, tiny_sdxl_path):
    for path, cls in [(tiny_sd_path, StableDiffusionPipeline), (tiny_sdxl_path, StableDiffusionXLPipeline)]:
        pipeline = DiffusionPipeline.from_pretrained(path)
        assert isinstance(pipeline, cls)
        image = pipeline("a red cube", num_inference_steps=2, height=32, width=32).images[0]
        assert image.size == (32, 32)
