"""`tunelab serve` tests: the keys of the tiny server (tests/serve/conftest.py's ``tiny_server``) and tiny
LoRA adapters for it."""

from __future__ import annotations

TINY_KEY = "tiny-api-key-1234"
TINY_ADMIN_KEY = "tiny-admin-key-5678"


def make_tiny_lora(path, model_dir, seed: int = 0):
    """A random LoRA over the tiny model of ``tiny_model_dir`` (q_proj and v_proj, rank 2), saved to ``path``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    model.save_pretrained(str(path))
    return path
