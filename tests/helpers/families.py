"""Tiny random models of the families people fine-tune (Llama, Qwen2, Qwen3, Gemma 2, Gemma 3 text, Mistral,
Phi-3), each built from its transformers config with the bundled tokenizer's vocabulary and a chat template like
the family's own, for tests/train/test_train_families.py.

The vocabulary is the bundled SmolLM2 one (no download); where a family's template needs its own control tokens
(``<|start_header_id|>``, ``<start_of_turn>``, ``[INST]``, ``<|user|>`` ...) they are added as special tokens,
so each control token is one token id as in the real tokenizer, and the model's vocabulary is sized to hold them.
Qwen2 and Qwen3 write ChatML with the ``<|im_start|>``/``<|im_end|>`` tokens the bundled tokenizer already has.
The templates are the families' published ones, cut to what a training chat uses (system, user, assistant; no
tools):

- Llama 3: ``<|begin_of_text|><|start_header_id|>ROLE<|end_header_id|>\\n\\nTEXT<|eot_id|>``.
- Qwen2: ChatML with Qwen's default system prompt when none is given.
- Qwen3: ChatML in non-thinking mode (``enable_thinking=False`` fixed: tunelab passes no template
  arguments): the generation prompt and the answer both carry the empty ``<think>\\n\\n</think>\\n\\n`` block.
- Gemma 2 and Gemma 3: no system role; the system prompt is folded into the first user turn (Gemma 3's
  template; Gemma 2's own raises on a system message), ``<start_of_turn>model`` for the assistant.
- Mistral: ``<s>[INST] SYSTEM\\n\\nUSER [/INST]ANSWER</s>`` (the system prompt folded into the user turn).
- Phi-3: ``<|system|>\\n...<|end|>\\n<|user|>\\n...<|end|>\\n<|assistant|>\\n`` and the EOS after the last turn.

The configs are tiny (hidden 32, 2 layers, 4 heads of 8, intermediate 64). Gemma 2 keeps its attention
soft-capping and Gemma 2/3 a sliding window, both set small (cap 1.0, window 8) so that they change the outputs
of a random tiny model on short chats: a path that dropped either would compute another function.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")

QWEN2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
         "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
         "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

QWEN3 = ("{% for message in messages %}{% if message['role'] == 'assistant' %}"
         "{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' + message['content'].lstrip('\n') + '<|im_end|>\n' }}"
         "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
         "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' }}{% endif %}")

GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
         "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
         "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
         "{% for message in loop_messages %}{% set role = 'model' if message['role'] == 'assistant' "
         "else message['role'] %}{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') "
         "+ (message['content'] | trim) + '<end_of_turn>\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")

MISTRAL = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
           "{% set system = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
           "{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
           "{% for message in loop_messages %}{% if message['role'] == 'user' %}"
           "{{ '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
           "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}")

PHI3 = ("{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
        "{{ '<|system|>\n' + message['content'] + '<|end|>\n' }}{% elif message['role'] == 'user' %}"
        "{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}{% elif message['role'] == 'assistant' %}"
        "{{ '<|assistant|>\n' + message['content'] + '<|end|>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, tie_word_embeddings=True)


@dataclass(frozen=True)
class Family:
    """A model family: its transformers classes, config overrides, chat template and the tokens it adds."""

    name: str
    config: str                      # transformers config class
    model: str                       # transformers causal-LM class
    template: str
    added: tuple[str, ...] = ()      # special tokens the template needs (beyond the bundled vocabulary)
    bos: str | None = None           # the tokenizer's BOS/EOS; None: the bundled one's
    eos: str | None = None
    stop: tuple[str, ...] = ()       # more end-of-turn tokens for the generation config
    extra: dict[str, Any] = field(default_factory=dict)

    def available(self) -> bool:
        import transformers

        return hasattr(transformers, self.config) and hasattr(transformers, self.model)


FAMILIES = [
    Family("llama", "LlamaConfig", "LlamaForCausalLM", LLAMA3,
           added=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
           bos="<|begin_of_text|>", eos="<|eot_id|>"),
    Family("qwen2", "Qwen2Config", "Qwen2ForCausalLM", QWEN2, eos="<|im_end|>"),
    Family("qwen3", "Qwen3Config", "Qwen3ForCausalLM", QWEN3, added=("<think>", "</think>"), eos="<|im_end|>",
           extra=dict(head_dim=8)),
    Family("gemma2", "Gemma2Config", "Gemma2ForCausalLM", GEMMA, added=("<bos>", "<start_of_turn>", "<end_of_turn>"),
           bos="<bos>", eos="<end_of_turn>",
           extra=dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=8, attn_logit_softcapping=1.0,
                      final_logit_softcapping=2.0, hidden_activation="gelu_pytorch_tanh")),
    Family("gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM", GEMMA,
           added=("<bos>", "<start_of_turn>", "<end_of_turn>"), bos="<bos>", eos="<end_of_turn>",
           extra=dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=8,
                      layer_types=["sliding_attention", "full_attention"])),
    Family("mistral", "MistralConfig", "MistralForCausalLM", MISTRAL, added=("<s>", "</s>", "[INST]", "[/INST]"),
           bos="<s>", eos="</s>", extra=dict(sliding_window=None, head_dim=8)),
    Family("phi3", "Phi3Config", "Phi3ForCausalLM", PHI3,
           added=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), eos="<|endoftext|>", stop=("<|end|>",)),
]

BY_NAME = {f.name: f for f in FAMILIES}


def family_tokenizer(fam: Family):
    """The bundled tokenizer with ``fam``'s control tokens, BOS/EOS and chat template."""
    from transformers import AutoTokenizer

    from tunelab.models.convert import resolve_local_path

    tok = AutoTokenizer.from_pretrained(str(resolve_local_path(None)))
    if fam.added:
        tok.add_special_tokens({"additional_special_tokens": list(fam.added)},
                               replace_extra_special_tokens=False)
    if fam.bos:
        tok.bos_token = fam.bos
    if fam.eos:
        tok.eos_token = fam.eos
    tok.chat_template = fam.template
    return tok


def build_family(fam: Family, out: Path, seed: int = 0) -> Path:
    """A tiny random ``fam`` model with its tokenizer, saved to ``out`` (an HF model dir)."""
    import torch
    import transformers

    tok = family_tokenizer(fam)
    ids = lambda t: tok.convert_tokens_to_ids(t)  # noqa: E731
    torch.manual_seed(seed)
    cfg = getattr(transformers, fam.config)(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                            **{**TINY, **fam.extra})
    model = getattr(transformers, fam.model)(cfg)
    stops = [tok.eos_token_id, *map(ids, fam.stop)]
    model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out
