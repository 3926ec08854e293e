"""Does a LoRA adapter belong on this base model? One check for every command that puts an adapter on a base
(train --init-adapter, eval --adapter, merge, serve), made before PEFT loads anything.

``check_adapter_fits(base, adapter)`` compares

1. the adapter's tensor shapes (read from the safetensors header, nothing is loaded) with the base's modules: an
   adapter of another architecture or size is refused with one line (PEFT would raise a 90-line size mismatch);
2. the base identity tunelab records beside the adapter when it trains one (``tunelab_train.json``,
   ``base_identity``: the base's name and path, the size fields of its config.json and a fingerprint of its weights)
   with the base given: an adapter trained on a same-shaped but different base (another fine-tune of the same
   architecture) is refused too, unless the caller allows it (``allow_other_base``: then ``warn`` says so). A base
   whose vocabulary size differs from the recorded one (a model extended by `tunelab vocab extend`, or its original)
   is refused first, always, naming both sizes: a LoRA that leaves the embeddings alone has the same shapes on both.

Adapters without a recorded identity (written by PEFT itself, or by tunelab before 0.3) get the shape check only.
The identity lives in tunelab's own file, not in adapter_config.json, so PEFT and vLLM load the adapter as ever.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tunelab.errors import ModelError
from tunelab.models.base import adapter_dir

TRAIN_META = "tunelab_train.json"  # beside adapter_config.json: how the adapter was trained, its base identity
IDENTITY_KEY = "base_identity"
# config.json fields that say what a base model is (tensor shapes aside): a difference here is another base
CONFIG_FIELDS = ("model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings",
                 "rope_theta", "rms_norm_eps", "tie_word_embeddings")
FINGERPRINT_VALUES = 256  # values read from the first row of every weight matrix


def config_summary(model_dir: Path) -> dict[str, Any]:
    """The identifying fields of a model directory's config.json (those it has)."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    return {k: cfg.get(k, text.get(k)) for k in CONFIG_FIELDS if k in cfg or k in text}


def weights_fingerprint(model_dir: Path) -> str | None:
    """A hash of the first values of every weight matrix in the directory's safetensors files, rounded to bf16 (so
    an fp32 base and its bf16 copy agree); None without safetensors files. Reads a few KB per tensor, not the
    weights: a 135M model takes milliseconds."""
    import torch
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    h = hashlib.sha256()
    found = False
    rows: dict[str, bytes] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                sl = st.get_slice(name)
                shape = sl.get_shape()
                if len(shape) < 2:  # norms and biases start equal in every random init: not identifying
                    continue
                idx = tuple(slice(0, 1) for _ in shape[:-1]) + (slice(0, FINGERPRINT_VALUES),)
                t = sl[idx].flatten().to(torch.float32).to(torch.bfloat16)
                rows[name] = t.view(torch.int16).numpy().tobytes()
                found = True
    for name in sorted(rows):
        h.update(name.encode() + b"\0" + rows[name])
    return h.hexdigest()[:16] if found else None


def base_identity(model_dir: Path, name: str | None = None) -> dict[str, Any]:
    """What tunelab records beside an adapter about the base it was trained on."""
    return {"name": name or str(model_dir), "path": str(model_dir), "config": config_summary(model_dir),
            "weights": weights_fingerprint(model_dir)}


def _train_meta(adapter: Path) -> dict[str, Any]:
    """tunelab_train.json beside an adapter ({} where there is none or it does not parse)."""
    try:
        meta = json.loads((Path(adapter) / TRAIN_META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def adapter_quantize(adapter: Path) -> str:
    """The base quantisation an adapter was trained on (``lora.quantize`` in its tunelab_train.json; none when the
    file does not say, as for an adapter written by PEFT itself)."""
    cfg = _train_meta(adapter).get("config") or {}
    return str((cfg.get("lora") or {}).get("quantize") or "none")


def recorded_base(adapter: Path) -> dict[str, Any] | None:
    """The base identity recorded with an adapter, None for an adapter without one."""
    ident = _train_meta(adapter).get(IDENTITY_KEY)
    return ident if isinstance(ident, dict) else None


def recorded_base_name(adapter: Path) -> str | None:
    """The name of the base an adapter was trained on, from tunelab's record or PEFT's adapter_config.json."""
    meta = _train_meta(adapter)
    ident = meta.get(IDENTITY_KEY)
    if isinstance(ident, dict) and ident.get("name"):
        return str(ident["name"])
    if meta.get("base_model"):
        return str(meta["base_model"])
    try:
        cfg = json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8"))
        return cfg.get("base_model_name_or_path") or None
    except (OSError, ValueError, AttributeError):
        return None


@dataclass
class BaseInfo:
    """A loaded base model as the check needs it: its parameter shapes (PEFT wrappers seen through) and its
    directory. Built once (``of``) before adapters attach, e.g. by the server at start-up."""

    path: Path | None
    shapes: dict[str, tuple[int, ...]]
    _identity: dict[str, Any] | None = field(default=None, repr=False)

    @classmethod
    def of(cls, model, path: str | Path | None) -> "BaseInfo":
        shapes = {}
        for name, p in model.named_parameters():
            if "lora_" in name or ".modules_to_save." in name:
                continue
            name = name.replace(".base_layer.", ".").replace(".original_module.", ".")
            if name.startswith("base_model.model."):  # a PeftModel around the base
                name = name[len("base_model.model."):]
            shapes[name] = tuple(p.shape)
        return cls(Path(path) if path is not None else None, shapes)

    def identity(self) -> dict[str, Any] | None:
        if self._identity is None and self.path is not None:
            self._identity = base_identity(self.path)
        return self._identity


def adapter_shapes(adapter: Path) -> dict[str, tuple[int, ...]]:
    """The adapter's tensor names (PEFT's ``base_model.model.`` prefix dropped) and shapes, from the file header."""
    from safetensors import safe_open

    f = Path(adapter) / "adapter_model.safetensors"
    if not f.is_file():
        return {}  # a .bin adapter: PEFT's own loading is the check
    try:
        with safe_open(str(f), framework="pt") as st:
            out = {k: tuple(st.get_slice(k).get_shape()) for k in st.keys()}
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        raise ModelError(f"adapter {adapter}: cannot read {f.name} ({str(e).splitlines()[0] if str(e) else e})") \
            from None
    return {(k[len("base_model.model."):] if k.startswith("base_model.model.") else k).replace(".base_layer.", "."): v
            for k, v in out.items()}  # (embedding layers a LoRA targets are saved whole, as base_layer)


LORA_PARTS = {  # tensor suffix -> (dimension of the tensor, dimension of the base weight it must equal)
    "lora_A.weight": (1, 1), "lora_B.weight": (0, 0), "lora_B.bias": (0, 0),
    "lora_embedding_A": (1, 0), "lora_embedding_B": (0, 1),
}


def shape_mismatch(base: BaseInfo, adapter: Path) -> str | None:
    """Why the adapter's tensors do not fit the base's modules (the first difference), None when they fit."""
    try:
        cfg = json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"adapter {adapter}: unreadable adapter_config.json ({e})") from None
    flip = bool(cfg.get("fan_in_fan_out"))  # GPT-2 style Conv1D weights are (in, out)
    for key, shape in sorted(adapter_shapes(adapter).items()):
        part = next((p for p in LORA_PARTS if key.endswith("." + p)), None)
        if part is None:
            if "lora_" in key:  # DoRA magnitudes and the like: PEFT checks them
                continue
            want = base.shapes.get(key)  # modules_to_save: the whole tensor, as the base's
            if want is None:
                return f"the base has no tensor {key}"
            if want != shape:
                return f"size mismatch for {key}: {list(shape)} in the adapter, {list(want)} in the base"
            continue
        module = key[:-len(part) - 1]
        want = base.shapes.get(module + ".weight")
        if want is None:
            return f"the base has no module {module} (adapter tensor {key})"
        mine, theirs = LORA_PARTS[part]
        if flip and part.startswith(("lora_A", "lora_B")):
            theirs = 1 - theirs
        if len(shape) <= mine or len(want) <= theirs or shape[mine] != want[theirs]:
            return (f"size mismatch for {key}: {list(shape)} in the adapter, the base's {module} has weight "
                    f"{list(want)}")
    return None


def identity_difference(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between a recorded base identity and the base given: config fields, then the weights."""
    diff = []
    rc, cc = recorded.get("config") or {}, current.get("config") or {}
    for k in CONFIG_FIELDS:
        if k in rc and k in cc and rc[k] != cc[k]:
            diff.append(f"{k} {rc[k]} vs {cc[k]}")
    if recorded.get("weights") and current.get("weights") and recorded["weights"] != current["weights"]:
        diff.append("other weights")
    return diff


def vocabulary_mismatch(adapter: Path, recorded: dict[str, Any] | None, current: dict[str, Any] | None) -> str | None:
    """The refusal of an adapter trained on a model with another vocabulary size than the base given (e.g. one whose
    vocabulary `tunelab vocab extend` extended), None when the sizes agree or either is unknown. Never allowed: the
    token ids the adapter learnt mean other text under the other tokenizer."""
    mine = ((recorded or {}).get("config") or {}).get("vocab_size")
    theirs = ((current or {}).get("config") or {}).get("vocab_size")
    if not isinstance(mine, int) or not isinstance(theirs, int) or mine == theirs:
        return None
    name = (recorded or {}).get("name") or (recorded or {}).get("path")
    return (f"adapter {adapter} was trained on a model with a vocabulary of {mine} tokens ({name}), the base model "
            f"{(current or {}).get('path')} has {theirs}: give the {'expanded ' if mine > theirs else ''}model it "
            "was trained on as --model")


def check_adapter_fits(base: BaseInfo, adapter: str | Path, *, allow_other_base: bool = False,
                       allow_hint: str = "", warn: Callable[[str], None] | None = None) -> None:
    """Refuse (ModelError, one line) an adapter whose tensors do not fit ``base``, or that was trained on another
    base than ``base`` (its recorded identity differs) unless ``allow_other_base``, when ``warn`` gets the line.
    ``allow_hint`` is how the caller's user allows another base (e.g. "or --allow-other-base to apply it anyway")."""
    adapter = Path(adapter)
    recorded = recorded_base(adapter)
    if recorded and base.path is not None:  # first: a vocabulary of another size is named as such
        if (refusal := vocabulary_mismatch(adapter, recorded, base.identity())) is not None:
            raise ModelError(refusal)
    trained_on = recorded_base_name(adapter)
    on = f" (it was trained on {trained_on})" if trained_on else ""
    why = shape_mismatch(base, adapter)
    if why is not None:
        raise ModelError(f"adapter {adapter} does not fit the base model: {why}{on}; give the base it was trained "
                         f"on as --model")
    current = base.identity()
    if not recorded or not current:
        return
    diff = identity_difference(recorded, current)
    if not diff:
        return
    name, path = recorded.get("name"), recorded.get("path")
    who = f"{name} ({path})" if path and path != name else f"{name or path}"
    core = f"adapter {adapter} was trained on another base model, {who}, not {base.path} ({', '.join(diff)})"
    if not allow_other_base:
        raise ModelError(f"{core}; give its base as --model" + (f", {allow_hint}" if allow_hint else ""))
    if warn is not None:
        warn(f"warning: {core}; applied anyway")


def adapter_load_error(adapter: str | Path, e: BaseException) -> ModelError:
    """PEFT's (or torch's) failure to load an adapter as one line: the size-mismatch line if there is one."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
    why = next((ln for ln in lines if ln.startswith("size mismatch")), lines[0])  # torch's first line is a header
    return ModelError(f"adapter {adapter} does not fit the base model: {why[:300]}")


def not_a_base_model(path: Path) -> str | None:
    """For a directory given as a base model that is a PEFT adapter: the line that says so, else None."""
    if (path / "config.json").is_file():
        return None
    a = adapter_dir(path)
    if not (a / "adapter_config.json").is_file():
        return None
    base = recorded_base_name(a)
    return (f"{path} is a LoRA adapter, not a base model: give it as --adapter {path}, with its base as --model"
            + (f" ({base})" if base else ""))
