"""The forgetting probe (the ``forgetting:`` section, ``ForgettingConfig``): perplexity on general data the task
does not train, measured on the same model in memory before and after training.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from tunelab.results import write_json
from tunelab.train.data import TrainData, load_train_data
from tunelab.train.loss import mean_nll
from tunelab.train.results import ForgettingResult
from tunelab.train.session import TrainSession


@dataclass
class ForgettingProbe:
    """Perplexity on general data the task does not train, before and after (the same model in memory)."""

    data: TrainData | None = None
    before: float | None = None
    after: float | None = None

    @classmethod
    def create(cls, run: TrainSession) -> "ForgettingProbe":
        f = run.cfg.forgetting
        if f is None:
            return cls()
        from tunelab.train.config import TrainDataConfig

        dc = TrainDataConfig(path=f.data, format=f.format, limit=f.limit, max_seq_len=f.max_seq_len)
        return cls(load_train_data(dc, run.tokenizer, method="lora"))

    def _nll(self, run: TrainSession, model, loss_module=None) -> float:
        return mean_nll(model, self.data.examples, device=run.device, autocast=run.autocast,
                        pad_id=run.tokenizer.pad_token_id or 0, loss_module=loss_module)

    def _skip(self, run: TrainSession, loss_module) -> bool:
        """Not measured here: without a probe; on processes other than the main one; under FSDP (where every
        process measures, on the sharded model) until ``loss_module``, the prepared one, is given."""
        return self.data is None or (loss_module is None if run.fsdp else not run.is_main)

    def measure_before(self, run: TrainSession, model, loss_module=None) -> None:
        """Before training. Under FSDP called twice: before sharding (skipped) and with the sharded model's
        ``loss_module`` from fit (with LoRA inside ``disable_adapter()``: the base)."""
        if self._skip(run, loss_module):
            return
        cached = run.out / "forgetting_before.json"
        if run.resume and cached.is_file():  # measured before the run was interrupted
            self.before = json.loads(cached.read_text())["nll"]
            return
        self.before = self._nll(run, model, loss_module)
        if run.is_main:
            write_json(cached, {"nll": self.before})
        run.log(f"forgetting probe before: perplexity {math.exp(self.before):.3f} on {len(self.data.examples)} "
                f"examples of {self.data.path.name}")

    def measure_after(self, run: TrainSession, model, loss_module=None) -> None:
        """After training; under FSDP on every process through the sharded model's ``loss_module``."""
        if self._skip(run, loss_module if run.fsdp else None):
            return
        self.after = self._nll(run, model, loss_module if run.fsdp else None)
        run.log(f"forgetting probe after: perplexity {math.exp(self.after):.3f} "
                f"(before {math.exp(self.before):.3f})")

    def result(self) -> ForgettingResult | None:
        if self.data is None or self.before is None:
            return None
        r = ForgettingResult(data=str(self.data.path), examples=len(self.data.examples),
                             target_tokens=self.data.stats.target_tokens, nll_before=round(self.before, 5),
                             perplexity_before=round(math.exp(self.before), 4))
        if self.after is not None:
            r.nll_after, r.perplexity_after = round(self.after, 5), round(math.exp(self.after), 4)
            r.perplexity_change_pct = round((math.exp(self.after - self.before) - 1) * 100, 2)
        return r
