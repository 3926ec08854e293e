"""The training recipes by method: ``RECIPES`` names each one's module, ``recipe(method)`` imports it.

A recipe module has ``run(cfg, *, resume=False, dry_run=False, log=print, console=None) -> dict`` (the report,
or the dry run's summary). `tunelab train` and the train stage of `tunelab run` (teacher-vs-gold experiments
included) start their runs through it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

RECIPES = {"lora": "tunelab.train.lora", "full": "tunelab.train.full", "pretrain": "tunelab.train.pretrain"}


def recipe(method: str) -> ModuleType:
    """The recipe module of ``method`` (a key of ``RECIPES``: ``TrainConfig.method`` allows no other)."""
    return importlib.import_module(RECIPES[method])
