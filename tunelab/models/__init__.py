"""Model backends behind one interface (see base.ModelBackend)."""

from __future__ import annotations

from tunelab.models.base import ChoiceScores, Generation, GenerationParams, ModelBackend

__all__ = ["ChoiceScores", "Generation", "GenerationParams", "ModelBackend", "load_model", "release_models"]

_LOADED: dict[tuple, ModelBackend] = {}


def load_model(spec: str | None = None, *, adapter: str | None = None, cache: bool = True,
               **options) -> ModelBackend:
    """Load a model by spec: None/'bundled' (SmolLM2-135M-Instruct), an HF directory, a .gguf file,
    or ``openai:MODEL`` (options: base_url, api_key_env, api_key_file, concurrency, price).
    Loaded models are memoised per process so an eval matrix loads each model once."""
    key = (spec, adapter, tuple(sorted((k, str(v)) for k, v in options.items())))
    if cache and key in _LOADED:
        return _LOADED[key]
    if spec and spec.startswith("openai:"):
        from tunelab.models.openai_api import OpenAIModel

        if adapter:
            from tunelab.errors import ModelError

            raise ModelError("--adapter applies to local models only")
        model: ModelBackend = OpenAIModel(spec.split(":", 1)[1], **options)
    else:
        from tunelab.models.local import LocalModel

        local_opts = {k: v for k, v in options.items() if k in ("device", "dtype", "batch_size", "allow_other_base")}
        model = LocalModel(spec, adapter=adapter, **local_opts)
    if cache:
        _LOADED[key] = model
    return model


def release_models() -> None:
    """Forget the memoised models (so their memory can be freed), e.g. before training or between eval stages."""
    import gc

    _LOADED.clear()
    gc.collect()
