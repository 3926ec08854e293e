"""The run folder (``--out``): runs that must not mix.

A run writes ``OUT/run_config.json`` when it starts training: its resolved config (after the command line's
overrides) without the fields that cannot change the trained weights (``FREE_FIELDS``), the sha256 of the data and
prompt files it reads, and the hash of both (``config_hash``), which every checkpoint also carries. Then

- ``--resume`` continues only a run with the same hash, or one whose input files only moved (other paths, the same
  digests); otherwise one line lists what differs (``optim.lr 0.0002 -> 0.001, data.path a.jsonl -> b.jsonl``) and
  nothing is touched. The free fields may differ
  (where the report goes, threads, logging and checkpoint cadence, the before/after eval and forgetting probe);
- without ``--resume``, an ``--out`` that holds a run (finished or not) is refused, unless ``--force``: then the
  run's own files (``RUN_FILES``) are removed and nothing else in the folder is.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from tunelab.data.io import dir_digest, file_digest, stable_hash
from tunelab.errors import ConfigError
from tunelab.train.checkpoint import latest_checkpoint, load_checkpoint_state
from tunelab.train.config import TrainConfig

RUN_CONFIG = "run_config.json"
# what a run writes into --out: the only files --force removes
RUN_FILES = ("adapter", "adapter-last", "model", "model-last", "checkpoints", "metrics.jsonl", "report.json",
             "report.html", RUN_CONFIG)
# fields that do not change the trained weights: they may differ between a run and its --resume, and are not hashed
FREE_FIELDS = ("name", "out", "train.threads", "train.log_every", "train.max_memory_gb", "checkpoint", "eval",
               "forgetting")
# fields added after runs were written: hashed only when set otherwise, so an older run still resumes
LATER_DEFAULTS = {"optim.optimizer": "adamw", "optim.fused": "auto", "optim.offload": False,
                  "trainable.match": None, "trainable.new_rows_only": False, "train.compile": "auto"}
INPUT_FIELDS = ("data.path", "data.prompt", "lora.init_adapter")  # files whose content is hashed (and data.mix's)


def _digest(path: str) -> str | None:
    """sha256 of a file, or of a folder's files (names and contents); None for a path that is not there."""
    p = Path(path)
    if p.is_file():
        return file_digest(p)[:16]
    if p.is_dir():
        return dir_digest(p)
    return None


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def resolved_config(cfg: TrainConfig) -> dict[str, Any]:
    """The config a run's weights depend on, as dotted fields: every field but FREE_FIELDS, and the digests of the
    files it reads (``inputs.data.path`` ...)."""
    flat = _flat(cfg.model_dump(mode="json"))
    out = {k: v for k, v in flat.items() if not any(k == f or k.startswith(f + ".") for f in FREE_FIELDS)
           and not (k in LATER_DEFAULTS and v == LATER_DEFAULTS[k])}
    files = {f: flat.get(f) for f in INPUT_FIELDS}
    for i, m in enumerate(cfg.data.mix):
        files[f"data.mix.{i}.path"], files[f"data.mix.{i}.prompt"] = m.path, m.prompt
    for k, v in files.items():
        if v:
            out[f"inputs.{k}"] = _digest(v)
    return out


def config_hash(resolved: dict[str, Any]) -> str:
    return stable_hash(resolved, 16)


def differences(old: dict[str, Any], new: dict[str, Any], limit: int = 6) -> str:
    """``field old -> new`` for each field that differs (at most ``limit``, then how many more)."""
    def short(v: Any) -> str:
        s = json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else v
        return s if len(s) <= 60 else "..." + s[-57:]

    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    parts = [f"{k} {short(old.get(k))} -> {short(new.get(k))}" for k in keys[:limit]]
    if len(keys) > limit:
        parts.append(f"{len(keys) - limit} more")
    return ", ".join(parts)


def moved_only(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """True when ``old`` and ``new`` differ only in the paths of input files whose contents are the same (their
    ``inputs.*`` digests equal): the same data reached through another path (a moved checkout, a config given by
    another path) is the same run."""
    keys = [k for k in set(old) | set(new) if old.get(k) != new.get(k)]
    return bool(keys) and all(old.get(f"inputs.{k}") is not None and old.get(f"inputs.{k}") == new.get(f"inputs.{k}")
                              for k in keys)


def read_run_config(out: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((Path(out) / RUN_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("config"), dict) else None


def write_run_config(out: Path, resolved: dict[str, Any]) -> None:
    from tunelab.results import write_json

    write_json(Path(out) / RUN_CONFIG, {"hash": config_hash(resolved), "config": resolved})


def check_out_dir(cfg: TrainConfig, out: Path, *, resume: bool, force: bool, dry_run: bool) -> dict[str, Any]:
    """Refuse (one line) a --resume of a run with another config, and a new run into a folder that holds one unless
    ``force``; returns this run's resolved config. Reads only: ``clear_run`` removes (on the main process)."""
    where = "out"
    resolved = resolved_config(cfg)
    if resume and force:
        raise ConfigError("--resume continues the run in --out with its own config, --force starts it over: give "
                          "one of them", where="<command line>")
    if resume:
        stored = read_run_config(out)
        ck = latest_checkpoint(out)
        if stored is not None:
            if config_hash(stored["config"]) != config_hash(resolved) and not moved_only(stored["config"], resolved):
                raise ConfigError(f"{out} holds a run with another config ({differences(stored['config'], resolved)})"
                                  ": resume it with its own config, or train into a new --out", where=where)
        elif ck is not None:
            theirs = load_checkpoint_state(ck).get("config_hash")
            if theirs is not None and theirs != config_hash(resolved):
                raise ConfigError(f"{out} holds a run with another config (hash {theirs}, this one "
                                  f"{config_hash(resolved)}): resume it with its own config, or train into a new "
                                  "--out", where=where)
        return resolved
    found = [f for f in RUN_FILES if (Path(out) / f).exists()]
    if found and not force and not dry_run:
        what = "a finished run" if (Path(out) / "report.json").is_file() else "an earlier run"
        raise ConfigError(f"{out} holds {what} ({', '.join(found[:4])}): add --resume to continue it, --force to "
                          "replace it, or choose a new --out", where=where)
    return resolved


def clear_run(out: Path) -> list[str]:
    """Remove a run's own files from ``out`` (RUN_FILES); anything else stays. The names removed."""
    gone = []
    for f in RUN_FILES:
        p = Path(out) / f
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
        else:
            continue
        gone.append(f)
    return gone
