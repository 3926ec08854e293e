"""`tunelab serve` (registered by tunelab/cli.py)."""

from __future__ import annotations

import logging
import sys
from typing import List, Optional

import typer


def _parse_adapters(items: list[str]) -> dict[str, str]:
    from tunelab.errors import ConfigError

    out: dict[str, str] = {}
    for it in items:
        name, sep, path = it.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ConfigError(f"--adapter {it!r}: expected NAME=PATH, e.g. --adapter sentiment=runs/lora/adapter",
                              where="<command line>")
        if name.strip() in out:
            raise ConfigError(f"--adapter: the name {name.strip()!r} is given twice", where="<command line>")
        out[name.strip()] = path.strip()
    return out


def serve_cmd(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Base model: bundled (default) | HF dir | .gguf"),
    adapter: List[str] = typer.Option([], "--adapter", "-a",
                                      help="NAME=PATH of a PEFT LoRA adapter, served as model NAME (repeatable)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (default: this machine only)."),
    port: int = typer.Option(8000, "--port", "-p", min=0, max=65535),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="TUNELAB_API_KEY", show_default=False,
                                          show_envvar=True,
                                          help="Require 'Authorization: Bearer KEY' (prefer the env variable: "
                                               "a flag is visible in the process list)."),
    served_model_name: Optional[str] = typer.Option(None, "--served-model-name",
                                                    help="The id clients send for the base model."),
    max_batch: int = typer.Option(32, "--max-batch", min=1, help="Sequences decoded together in one step."),
    max_concurrent: int = typer.Option(128, "--max-concurrent", min=1,
                                       help="Requests in flight; more get 429."),
    max_prefill_tokens: int = typer.Option(4096, "--max-prefill-tokens", min=16,
                                           help="Padded prompt tokens prefilled in one forward pass."),
    max_loaded_adapters: int = typer.Option(4, "--max-loaded-adapters", min=1, help="Adapters kept loaded (LRU)."),
    max_body_bytes: int = typer.Option(1 << 20, "--max-body-bytes", min=1024, help="Larger bodies get 413."),
    max_prompt_tokens: Optional[int] = typer.Option(None, "--max-prompt-tokens", min=1,
                                                    help="Longer prompts get 400 (default: the context length)."),
    max_tokens_limit: int = typer.Option(2048, "--max-tokens-limit", min=1,
                                         help="The largest max_tokens a request may ask for."),
    default_max_tokens: int = typer.Option(512, "--default-max-tokens", min=1,
                                           help="max_tokens of chat requests that name none."),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 (autocast)"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1,
                                          help="torch CPU threads (default: torch's choice; 1 is often "
                                               "faster on a busy machine)."),
    log_level: str = typer.Option("info", "--log-level", help="debug | info | warning | error"),
) -> None:
    """Serve the base model and LoRA adapters over an OpenAI-compatible API (chat, completions, models)."""
    import uvicorn
    from pydantic import ValidationError

    from tunelab.config import format_validation_error
    from tunelab.errors import ConfigError
    from tunelab.serve.app import build_app
    from tunelab.serve.config import ServeConfig

    try:
        cfg = ServeConfig(model=model, served_model_name=served_model_name, adapters=_parse_adapters(adapter),
                          host=host, port=port, api_key=api_key or None, device=device, dtype=dtype,
                          max_batch=max_batch, max_concurrent=max_concurrent, max_prefill_tokens=max_prefill_tokens,
                          max_loaded_adapters=max_loaded_adapters, max_body_bytes=max_body_bytes,
                          max_prompt_tokens=max_prompt_tokens, max_tokens_limit=max_tokens_limit,
                          default_max_tokens=default_max_tokens)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e), where="<command line>") from None
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s", stream=sys.stderr)
    if not cfg.is_loopback and cfg.api_key is None:
        logging.getLogger("tunelab.serve").warning(
            "binding %s without an API key: anyone who can reach this port can use the model "
            "(set TUNELAB_API_KEY)", cfg.host)
    app = build_app(cfg)
    serving = app.state.serving
    auth = "API key required" if cfg.api_key is not None else "no API key"
    print(f"tunelab serve: {serving.base_id} + {len(serving.registry)} adapter(s) on "
          f"http://{cfg.host}:{cfg.port}/v1 ({auth}; docs at /docs)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=log_level.lower(), timeout_graceful_shutdown=5)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_cmd)
