"""`tunelab serve`: an OpenAI-compatible server over one base model and its LoRA adapters.

Layout (after vLLM's entrypoints): ``protocol`` (pydantic wire models), ``router`` (thin FastAPI routes),
``serving`` (requests -> engine -> responses and SSE), ``engine`` (continuous batching), ``adapters``
(registry + LRU slots), ``errors`` (OpenAI-shaped errors), ``app`` (build and run), ``command`` (the CLI).
"""
