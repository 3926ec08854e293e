"""Training progress: a rich progress bar on a terminal, plain ``step N/M  loss ...`` log lines elsewhere."""

from __future__ import annotations

from typing import Any, Callable


class ProgressView:
    """A rich progress bar with loss, lr and tok/s on a terminal; plain log lines elsewhere (CI, subprocess)."""

    def __init__(self, total: int, start: int, console, enabled: bool, log: Callable[[str], None], every: int):
        self.total, self.enabled, self.log, self.every = total, enabled, log, every
        self.bar = None
        if enabled and console is not None and console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
                TimeRemainingColumn

            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[tps]} tok/s"),
                                TimeElapsedColumn(), TimeRemainingColumn(), console=console)
            self.task = self.bar.add_task("train", total=total, completed=start, loss="-", lr="-", tps="-")
            self.bar.start()

    def update(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=row["step"], loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                            tps=f"{row['tok_s']:.0f}")
        elif row["step"] % self.every == 0 or row["step"] == self.total:
            gn = f"  grad-norm {row['grad_norm']:.3f}" if row["grad_norm"] is not None else ""
            self.log(f"step {row['step']}/{self.total}  loss {row['loss']:.4f}  lr {row['lr']:.2e}{gn}  "
                     f"{row['tok_s']:.0f} tok/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
