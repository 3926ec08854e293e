"""LoRA adapters served by name: a registry (what may be asked for) and LRU slots (what is in memory).

The registry is read by request handlers on the event loop; the slots are touched only by the engine
thread, between decode steps, because loading or deleting an adapter changes the model's modules. All
adapters live in one ``PeftModel`` over the base model, so one forward pass serves a batch that mixes
adapters and the base (PEFT's ``adapter_names`` argument routes each row through its own LoRA weights).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import OrderedDict, Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab.errors import ModelError
from tunelab.models.adapters import BaseInfo, adapter_quantize, check_adapter_fits
from tunelab.models.base import adapter_dir

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


class AdapterError(Exception):
    """An adapter that cannot be registered or loaded; the message says what to fix."""


@dataclass(frozen=True)
class AdapterEntry:
    name: str
    path: Path
    chat_template: str | None
    created: int
    version: int


def resolve_adapter_dir(path: str | Path) -> Path:
    """The directory holding ``adapter_config.json`` (a tunelab run's ``adapter/`` subfolder is accepted),
    checked to be a LoRA adapter that can share a batch with others."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise AdapterError(f"adapter directory not found: {p}")
    p = adapter_dir(p)
    cfg_file = p / "adapter_config.json"
    if not cfg_file.is_file():
        raise AdapterError(f"{p} is not a PEFT adapter directory (no adapter_config.json)")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterError(f"{cfg_file}: unreadable adapter config ({e})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{p}: only LoRA adapters can be served (peft_type is {cfg.get('peft_type')!r})")
    if cfg.get("use_dora"):
        raise AdapterError(f"{p}: DoRA adapters cannot share a batch with other adapters; "
                           "merge it into a base model first and serve that")
    if not any((p / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
        raise AdapterError(f"{p}: no adapter_model.safetensors (or .bin) beside adapter_config.json")
    return p.resolve()


def registrable_dir(path: str, roots: list[Path], allowed: set[Path]) -> Path:
    """The adapter directory an admin registration of ``path`` may use: resolved (symlinks, ``..``), it must lie
    under one of ``roots`` (resolved directories) or be one of the ``allowed`` adapter directories (those the
    server started with). A path that does not exist gets the same answer as one outside: the error tells
    nothing about the file system beyond the roots."""
    refused = AdapterError(f"adapter path {path!r} does not exist or is not under a directory this server "
                           "registers adapters from (--adapter-root)")

    def inside(p: Path) -> bool:
        return p in allowed or any(p == r or p.is_relative_to(r) for r in roots)

    try:
        real = Path(os.path.realpath(Path(path).expanduser()))
    except (OSError, ValueError, RuntimeError):
        raise refused from None
    if not (inside(real) or inside(Path(os.path.realpath(real / "adapter")))) or not real.is_dir():
        raise refused
    folder = Path(os.path.realpath(adapter_dir(real)))  # a run folder's adapter/ may be a link out of the root
    if not inside(folder):
        raise refused
    return resolve_adapter_dir(folder)


class AdapterRegistry:
    """Names clients may send, mapped to adapter directories. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, AdapterEntry] = {}
        self._version = 0
        self.base: BaseInfo | None = None  # once the base model is loaded: adapters must fit it (``check``)

    def check(self, folder: Path) -> None:
        """Refuse an adapter that does not fit the base model or was trained on another base."""
        if self.base is not None:
            try:
                check_adapter_fits(self.base, folder)
            except ModelError as e:
                raise AdapterError(str(e)) from None

    def register(self, name: str, path: str | Path, *, replace: bool = False) -> AdapterEntry:
        folder = resolve_adapter_dir(path)
        self.check(folder)
        quantize = adapter_quantize(folder)
        if quantize != "none":  # many adapters share one base here: it stays full precision
            logging.getLogger("tunelab.serve").warning(
                "adapter %r was trained on the %s base (QLoRA) and is served on the full-precision base, whose "
                "answers can differ (NSMC: 76.8%% here against 79.0%% merged); for its exact weights serve "
                "`tunelab merge`'s output as the model", name, quantize)
        tmpl_file = folder / "chat_template.jinja"
        template = tmpl_file.read_text(encoding="utf-8") if tmpl_file.is_file() else None
        with self._lock:
            if name in self._entries and not replace:
                raise AdapterError(f"an adapter named {name!r} is already registered")
            self._version += 1
            entry = AdapterEntry(name=name, path=folder, chat_template=template,
                                 created=int(time.time()), version=self._version)
            self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> bool:
        with self._lock:
            return self._entries.pop(name, None) is not None

    def get(self, name: str) -> AdapterEntry | None:
        with self._lock:
            return self._entries.get(name)

    def entries(self) -> list[AdapterEntry]:
        with self._lock:
            return list(self._entries.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


class AdapterSlots:
    """Adapters loaded into the model, at most ``capacity``, least recently used evicted first.

    Engine thread only. A slot in use by a running sequence is pinned and never evicted; when every slot
    is pinned, ``acquire`` returns None and the request waits for one to free up.
    """

    def __init__(self, model: torch.nn.Module, registry: AdapterRegistry, capacity: int):
        self.model = model  # the plain model until the first adapter loads, then a PeftModel around it
        self.registry = registry
        self.capacity = capacity
        self._loaded: OrderedDict[tuple[str, int], str] = OrderedDict()  # (name, version) -> PEFT name
        self._pins: Counter[str] = Counter()
        self._counter = 0

    def __len__(self) -> int:
        return len(self._loaded)

    def acquire(self, entry: AdapterEntry | None) -> str | None:
        """The PEFT adapter name to route a row through (loading it if needed), pinned until ``release``."""
        if entry is None:
            return BASE
        key = (entry.name, entry.version)
        internal = self._loaded.get(key)
        if internal is None:
            victim = self._victim() if len(self._loaded) >= self.capacity else None
            if len(self._loaded) >= self.capacity and victim is None:
                return None
            internal = self._load(entry)  # load before evicting: a PeftModel must keep one adapter
            self._loaded[key] = internal
            if victim is not None:
                self._unload(victim)
        self._loaded.move_to_end(key)
        self._pins[internal] += 1
        return internal

    def release(self, internal: str) -> None:
        if internal == BASE:
            return
        self._pins[internal] -= 1
        if self._pins[internal] <= 0:
            del self._pins[internal]

    def sweep(self) -> None:
        """Unload adapters that were unregistered or replaced, once no running sequence uses them."""
        for key, internal in list(self._loaded.items()):
            stale = self._is_stale(key)
            # PEFT cannot drop its last adapter; a stale last one stays loaded (unreachable) until replaced.
            if stale and not self._pins.get(internal) and len(self._loaded) > 1:
                self._unload(key)

    # -- internals -----------------------------------------------------------------------------------
    def _victim(self) -> tuple[str, int] | None:
        """The adapter to evict: an unregistered one if any, else the least recently used; never a pinned one."""
        free = [key for key, internal in self._loaded.items() if not self._pins.get(internal)]  # oldest first
        stale = [key for key in free if self._is_stale(key)]
        return (stale or free or [None])[0]

    def _is_stale(self, key: tuple[str, int]) -> bool:
        cur = self.registry.get(key[0])
        return cur is None or cur.version != key[1]

    def _load(self, entry: AdapterEntry) -> str:
        from peft import PeftModel

        self._counter += 1
        internal = f"adapter{self._counter}"  # PEFT names must be valid module keys; user names may not be
        try:
            if not hasattr(self.model, "peft_config"):
                self.model = PeftModel.from_pretrained(self.model, str(entry.path), adapter_name=internal)
            else:
                self.model.load_adapter(str(entry.path), adapter_name=internal)
        except Exception as e:  # noqa: BLE001 - any failure becomes a clear error for the request
            raise AdapterError(f"cannot load adapter {entry.name!r} from {entry.path}: "
                               f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        self.model.eval()
        route_saved_modules(self.model)
        return internal

    def _unload(self, key: tuple[str, int]) -> None:
        internal = self._loaded.pop(key)
        unroute_saved_modules(self.model)  # PEFT's delete expects only the copies it made itself
        self.model.delete_adapter(internal)
        route_saved_modules(self.model)


def route_saved_modules(model: torch.nn.Module) -> None:
    """Give every loaded adapter an entry in every ``modules_to_save`` wrapper: the base module, shared.

    An adapter that trains whole modules (``modules_to_save: [embed_tokens]``, the default NSMC recipe) wraps
    them with a per-adapter copy. In a mixed batch PEFT routes each row to ``modules_to_save[its adapter]``,
    so rows of an adapter without that copy would fail (KeyError); for them the module is the base's (shared,
    no weights are copied).
    """
    names = list(getattr(model, "peft_config", {}))
    for m in _saved_module_wrappers(model):
        for name in names:
            if name not in m.modules_to_save:
                m.modules_to_save[name] = m.original_module


def unroute_saved_modules(model: torch.nn.Module) -> None:
    """Undo ``route_saved_modules`` (before PEFT deletes an adapter), and give a wrapper left without an
    active adapter one of its own copies, as PEFT's delete_adapter indexes the active one."""
    for m in _saved_module_wrappers(model):
        for name in [k for k, v in m.modules_to_save.items() if v is m.original_module]:
            del m.modules_to_save[name]
        if not m.active_adapters and len(m.modules_to_save):
            m.set_adapter(next(iter(m.modules_to_save)), inference_mode=True)


def _saved_module_wrappers(model: torch.nn.Module) -> list:
    from peft.utils import ModulesToSaveWrapper

    return [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]
