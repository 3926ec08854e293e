"""Local transformers backend: the bundled GGUF, any HF directory or GGUF file, plus an optional PEFT adapter."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Callable

import torch

from tunelab.data.io import file_digest
from tunelab.errors import ConfigError, ModelError
from tunelab.models.adapters import BaseInfo, adapter_load_error, adapter_quantize, check_adapter_fits
from tunelab.models.base import ChoiceScores, Generation, GenerationParams, Message, find_adapter_dir
from tunelab.models.convert import resolve_local_path
from tunelab.models.scoring import PrefixScorer, autocast_context, cpu_has_fast_bf16  # noqa: F401

FALLBACK_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def warn_line(msg: str) -> None:
    """A warning for the user, on stderr (the library has no console of its own)."""
    import sys

    print(msg, file=sys.stderr, flush=True)


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


HASHED_FILE_BYTES = 256 * 2**20  # files up to this size are identified by their content (adapters, configs)


def _dir_identity(path: Path) -> str:
    """A stable identity of a model/adapter directory for the call cache: the names of its files and, for each, its
    content hash (up to HASHED_FILE_BYTES; larger weight files by size and modification time in nanoseconds, so a
    multi-GB base model is not read at every load). Two adapters of the same shape written in the same second are
    two identities (names, sizes and whole-second mtimes alone made them one, and the cache answered one with the
    other's answers)."""
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file():
            st = f.stat()
            what = file_digest(f) if st.st_size <= HASHED_FILE_BYTES else f"{st.st_size}:{st.st_mtime_ns}"
            h.update(f"{f.relative_to(path)}:{what}".encode())
    return h.hexdigest()[:16]


class LocalModel:
    """A causal LM from transformers behind the ModelBackend interface."""

    supports_scoring = True

    def __init__(self, spec: str | None = None, *, adapter: str | os.PathLike | None = None,
                 device: str = "auto", dtype: str = "auto", batch_size: int = 16, allow_other_base: bool = False):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.path = resolve_local_path(spec)
        self.device = pick_device(device)
        self.batch_size = batch_size
        self.adapter_path = find_adapter_dir(Path(adapter)) if adapter else None
        # A QLoRA adapter goes on the base it was trained against: the weights dequantised from nf4/int8 (what
        # `tunelab merge` folds it into), not the fp32 ones it approximated (2.2 points lower on NSMC, measured).
        self.dequantized = self._qlora_base(self.adapter_path)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.path))
            if self.dequantized != "none":
                from tunelab.models.quantize import load_dequantized

                model = load_dequantized(self.path, self.dequantized)
            else:
                model = AutoModelForCausalLM.from_pretrained(str(self.path), dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot load model from {self.path}: {str(e).splitlines()[0]}") from None
        if self.adapter_path is not None:
            model = self._attach_adapter(model, self.adapter_path, allow_other_base=allow_other_base)
        self.model = model.to(self.device).eval()
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if not getattr(self.tokenizer, "chat_template", None):
            self.tokenizer.chat_template = FALLBACK_TEMPLATE
        self.autocast_dtype = self._pick_autocast(dtype)
        base = "smollm2-135m" if spec is None or str(spec).lower() in ("bundled", "default", "smollm2") \
            else Path(str(spec)).name
        self.name = base + (f"+{self.adapter_path.name}" if self.adapter_path else "")
        ident = _dir_identity(self.path) + (":" + _dir_identity(self.adapter_path) if self.adapter_path else "")
        dq = f":dequantized-{self.dequantized}" if self.dequantized != "none" else ""
        self.identity = f"local:{self.path.name}:{ident}{dq}:{self.autocast_dtype}"
        self._scorer = PrefixScorer(self.model, autocast_dtype=self.autocast_dtype)
        self._eot: str | None = None

    # -- loading -------------------------------------------------------------------------------------
    @staticmethod
    def _qlora_base(adapter: Path | None) -> str:
        """``nf4``/``int8`` where ``adapter`` was trained on a quantised base and bitsandbytes is here to rebuild
        that base; ``none`` otherwise (without bitsandbytes the adapter goes on the fp32 base, with a warning)."""
        from tunelab.models.quantize import require_bitsandbytes

        q = adapter_quantize(adapter) if adapter is not None else "none"
        if q == "none":
            return q
        try:
            require_bitsandbytes()
        except ConfigError:
            warn_line(f"{adapter} was trained on the {q} base (QLoRA); without bitsandbytes it goes on the "
                      f"full-precision base, whose answers can differ: pip install bitsandbytes, or tunelab merge it")
            return "none"
        warn_line(f"{adapter} was trained on the {q} base (QLoRA): the base is loaded dequantised from {q}, "
                  f"the weights the adapter was trained against")
        return q

    def _attach_adapter(self, model, adapter: Path, *, allow_other_base: bool = False):
        from peft import PeftModel

        # One line instead of PEFT's size-mismatch traceback, and no silent answers from another base's adapter.
        check_adapter_fits(BaseInfo.of(model, self.path), adapter, allow_other_base=allow_other_base,
                           allow_hint="or --allow-other-base to apply it anyway", warn=warn_line)
        tmpl = adapter / "chat_template.jinja"
        if tmpl.is_file():  # train and inference render the same tokens
            self.tokenizer.chat_template = tmpl.read_text(encoding="utf-8")
        try:
            adapted = PeftModel.from_pretrained(model, str(adapter))
        except (RuntimeError, ValueError, KeyError) as e:
            raise adapter_load_error(adapter, e) from None
        # One adapter for the model's lifetime: fold it into the (fp32) base weights. Unmerged PEFT layers run
        # two extra small matmuls per linear and per token (the eval of one adapter cost ~10x the base's on the
        # CPU); the merged weights give the same outputs (`tunelab merge` checks greedy equality) at the base's
        # speed. Serving many adapters keeps them unmerged (serve/adapters.py).
        return adapted.merge_and_unload()

    def _pick_autocast(self, dtype: str) -> torch.dtype | None:
        if dtype in ("float32", "fp32"):
            return None
        if dtype in ("bfloat16", "bf16"):
            return torch.bfloat16
        if dtype != "auto":
            raise ModelError(f"unknown dtype {dtype!r}; expected auto, float32 or bfloat16")
        if self.device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_fast_bf16() else None

    def autocast(self):
        """The autocast context every forward of this model runs in (a no-op without a fast low precision)."""
        return autocast_context(self.device.type, self.autocast_dtype)

    # -- rendering -----------------------------------------------------------------------------------
    def render(self, messages: list[Message], *, add_generation_prompt: bool = True) -> str:
        """The exact text the model sees (chat template applied)."""
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def encode(self, messages: list[Message]) -> list[int]:
        return self.tokenizer(self.render(messages), add_special_tokens=False)["input_ids"]

    def count_tokens(self, messages: list[Message]) -> int:
        return len(self.encode(messages))

    @property
    def context_length(self) -> int | None:
        """The most tokens the model was trained to attend over: its config's ``max_position_embeddings``, else
        the tokenizer's ``model_max_length`` (when it is a real limit, not transformers' "no limit" sentinel)."""
        n = getattr(self.model.config, "max_position_embeddings", None)
        if not n:
            n = getattr(self.tokenizer, "model_max_length", None)
            n = n if n and n < 10**9 else None
        return int(n) if n else None

    @property
    def end_of_turn(self) -> str:
        """The text the chat template puts after an assistant answer (e.g. ``<|im_end|>``)."""
        if self._eot is None:
            probe = [{"role": "user", "content": "x"}]
            with_answer = self.tokenizer.apply_chat_template(
                probe + [{"role": "assistant", "content": "ANSWER_SENTINEL"}], tokenize=False)
            tail = with_answer.split("ANSWER_SENTINEL", 1)[-1].strip()
            self._eot = tail or (self.tokenizer.eos_token or "")
        return self._eot

    def choice_token_ids(self, prompt_text: str, choice: str, *, include_end: bool = True) -> list[int]:
        """Token ids of ``choice`` (and the end-of-turn marker) as they follow ``prompt_text``."""
        tok = self.tokenizer
        full = prompt_text + choice + (self.end_of_turn if include_end else "")
        p_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
        f_ids = tok(full, add_special_tokens=False)["input_ids"]
        if f_ids[:len(p_ids)] == p_ids and len(f_ids) > len(p_ids):
            return f_ids[len(p_ids):]
        ids = tok(choice, add_special_tokens=False)["input_ids"]
        if include_end and self.end_of_turn:
            ids += tok(self.end_of_turn, add_special_tokens=False)["input_ids"]
        return ids

    # -- operations ----------------------------------------------------------------------------------
    def score_choices(self, prompts: list[list[Message]], choices: list[str], *,
                      progress: Callable[[int], None] | None = None,
                      include_end: bool = True) -> list[ChoiceScores]:
        t0 = time.perf_counter()
        texts = [self.render(m) for m in prompts]
        enc = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        choice_ids = [self.choice_token_ids(texts[0], c, include_end=include_end) for c in choices]
        scores = self._scorer.score(enc, choice_ids, on_items=progress)
        per_item_ms = (time.perf_counter() - t0) * 1000 / max(1, len(prompts))
        return [ChoiceScores(logprobs=s, prompt_tokens=len(e), choice_tokens=[len(c) for c in choice_ids],
                             latency_ms=per_item_ms) for s, e in zip(scores, enc)]

    @torch.inference_mode()
    def generate(self, prompts: list[list[Message]], params: GenerationParams, *,
                 progress: Callable[[int], None] | None = None) -> list[Generation]:
        """Batched generation with left padding; batches are formed from prompts of similar length."""
        tok = self.tokenizer
        texts = [self.render(m) for m in prompts]
        enc = tok(texts, add_special_tokens=False)["input_ids"]
        order = sorted(range(len(texts)), key=lambda i: len(enc[i]))
        out: list[Generation | None] = [None] * len(texts)
        eos_ids = self.eos_ids()
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            t0 = time.perf_counter()
            width = max(len(enc[i]) for i in idx)
            pad = tok.pad_token_id
            input_ids = torch.tensor([[pad] * (width - len(enc[i])) + enc[i] for i in idx])
            attn = torch.tensor([[0] * (width - len(enc[i])) + [1] * len(enc[i]) for i in idx])
            kwargs = dict(max_new_tokens=params.max_new_tokens, pad_token_id=pad, eos_token_id=eos_ids)
            if params.greedy:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            else:
                kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
                if params.seed is not None:
                    torch.manual_seed(params.seed + start)
            if params.stop:
                kwargs.update(stop_strings=list(params.stop), tokenizer=tok)
            with self.autocast():
                seqs = self.model.generate(input_ids=input_ids.to(self.device),
                                           attention_mask=attn.to(self.device), **kwargs)
            ms = (time.perf_counter() - t0) * 1000 / len(idx)
            for row, i in enumerate(idx):
                new = seqs[row, width:].tolist()
                n_new = len(new)
                finish = "length"
                for j, t in enumerate(new):
                    if t in eos_ids:
                        new, n_new, finish = new[:j], j + 1, "stop"
                        break
                text = tok.decode(new, skip_special_tokens=True)
                for s in params.stop:
                    if s in text:
                        text, finish = text.split(s, 1)[0], "stop"
                out[i] = Generation(text=text, prompt_tokens=len(enc[i]), completion_tokens=n_new,
                                    finish_reason=finish, latency_ms=ms)
            if progress:
                progress(len(idx))
        return out  # type: ignore[return-value]

    def eos_ids(self) -> list[int]:
        """Token ids that end a generation: the tokenizer's EOS, the generation config's, the end-of-turn."""
        ids = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        if isinstance(gen_eos, int):
            ids.add(gen_eos)
        elif gen_eos:
            ids.update(gen_eos)
        eot = self.tokenizer.convert_tokens_to_ids(self.end_of_turn) if self.end_of_turn else None
        if isinstance(eot, int) and eot != self.tokenizer.unk_token_id:
            ids.add(eot)
        return sorted(ids)

    def describe(self) -> dict:
        return {"name": self.name, "path": str(self.path), "adapter": str(self.adapter_path or ""),
                "device": str(self.device), "autocast": str(self.autocast_dtype),
                "parameters": sum(p.numel() for p in self.model.parameters())}
