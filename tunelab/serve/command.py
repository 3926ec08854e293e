"""`tunelab serve` (registered by tunelab/cli.py)."""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys
from typing import List, Optional

import typer

from tunelab.options import field_option, given_fields
from tunelab.serve.config import ServeConfig


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


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (before the model loads, so a port in use is one line, not a log line
    after startup); the server then listens on it."""
    from tunelab.errors import ConfigError

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)  # as uvicorn binds it
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart reuses the port
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        why = "is in use (another server?); pick another with --port" if e.errno == errno.EADDRINUSE else \
            f"cannot be bound ({e.strerror or e})"
        raise ConfigError(f"port {port} on {host} {why}", where="<command line>") from None
    sock.set_inheritable(True)
    return sock


def serve_cmd(
    ctx: typer.Context,
    model: Optional[str] = field_option(ServeConfig, "model", "--model", "-m",
                                       help="Base model: bundled (default) | HF dir | .gguf"),
    adapter: List[str] = typer.Option([], "--adapter", "-a",
                                      help="NAME=PATH of a PEFT LoRA adapter, served as model NAME (repeatable)."),
    host: str = field_option(ServeConfig, "host", "--host", help="Interface to bind (default: this machine only)."),
    port: int = field_option(ServeConfig, "port", "--port", "-p"),
    api_key: Optional[str] = field_option(ServeConfig, "api_key", "--api-key", envvar="TUNELAB_API_KEY",
                                          show_envvar=True,
                                          help="Require 'Authorization: Bearer KEY' (prefer the env variable: "
                                               "a flag is visible in the process list)."),
    adapter_root: List[str] = field_option(ServeConfig, "adapter_roots", "--adapter-root",
                                           help="A directory under which the admin endpoint may register "
                                                "adapters (repeatable; the admin key comes from "
                                                "TUNELAB_ADMIN_KEY)."),
    served_model_name: Optional[str] = field_option(ServeConfig, "served_model_name", "--served-model-name",
                                                    help="The id clients send for the base model."),
    allow_no_key: bool = field_option(ServeConfig, "allow_no_key", "--allow-no-key",
                                      help="Serve on an interface other than loopback without an API key "
                                           "(refused otherwise)."),
    max_batch: int = field_option(ServeConfig, "max_batch", "--max-batch",
                                  help="Sequences decoded together in one step."),
    max_concurrent: int = field_option(ServeConfig, "max_concurrent", "--max-concurrent",
                                       help="Sequences in flight (prompts times n); a request that does not "
                                            "fit now gets 429."),
    max_sequences_per_request: int = field_option(ServeConfig, "max_sequences_per_request",
                                                  "--max-sequences-per-request",
                                                  help="Sequences (prompts times n) one request may ask for; "
                                                       "more get 400."),
    max_prefill_tokens: int = field_option(ServeConfig, "max_prefill_tokens", "--max-prefill-tokens",
                                           help="Padded prompt tokens prefilled in one forward pass."),
    max_loaded_adapters: int = field_option(ServeConfig, "max_loaded_adapters", "--max-loaded-adapters",
                                            help="Adapters kept loaded (LRU)."),
    max_body_bytes: int = field_option(ServeConfig, "max_body_bytes", "--max-body-bytes",
                                       help="Larger bodies get 413."),
    max_prompt_tokens: Optional[int] = field_option(ServeConfig, "max_prompt_tokens", "--max-prompt-tokens",
                                                    help="Longer prompts get 400 (default: the context length)."),
    max_tokens_limit: int = field_option(ServeConfig, "max_tokens_limit", "--max-tokens-limit",
                                         help="The largest max_tokens a request may ask for."),
    default_max_tokens: int = field_option(ServeConfig, "default_max_tokens", "--default-max-tokens",
                                           help="max_tokens of chat requests that name none."),
    dtype: str = field_option(ServeConfig, "dtype", "--dtype", help="auto | float32 | bfloat16 (autocast)"),
    device: str = field_option(ServeConfig, "device", "--device", help="auto | cpu | cuda"),
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
    from tunelab.serve.app import build_app, log_config, precision_note

    settings = given_fields(ctx, serve_cmd)
    if not api_key:  # an empty TUNELAB_API_KEY is no key
        settings.pop("api_key", None)
    if os.environ.get("TUNELAB_ADMIN_KEY"):  # environment only: a flag would show in the process list
        settings["admin_key"] = os.environ["TUNELAB_ADMIN_KEY"]
    try:
        cfg = ServeConfig(adapters=_parse_adapters(adapter), **settings)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e), where="<command line>") from None
    if not cfg.is_loopback and cfg.api_key is None and not cfg.allow_no_key:
        raise ConfigError(f"--host {cfg.host} without an API key would let anyone who can reach the port use the "
                          "model: set TUNELAB_API_KEY, or pass --allow-no-key", where="<command line>")
    sock = bind(cfg.host, cfg.port)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s", stream=sys.stderr)
    if not cfg.is_loopback and cfg.api_key is None:
        logging.getLogger("tunelab.serve").warning(
            "binding %s without an API key (--allow-no-key): anyone who can reach this port can use the model",
            cfg.host)
    app = build_app(cfg)
    serving = app.state.serving
    auth = "API key required" if cfg.api_key is not None else "no API key"
    auth += "; admin endpoints on" if cfg.admin_key is not None else "; admin endpoints off"
    h = serving.health()
    print(f"tunelab serve: {serving.base_id} + {len(serving.registry)} adapter(s) on "
          f"http://{cfg.host}:{sock.getsockname()[1]}/v1 ({auth}; {precision_note(h.dtype, h.deterministic)}; "
          "docs at /docs)", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=log_level.lower(),
                            timeout_graceful_shutdown=5, log_config=log_config())
    uvicorn.Server(config).run(sockets=[sock])


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_cmd)
