"""Progress bars for long work (rich), quiet when output is not a terminal."""

from __future__ import annotations

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from .console import err_console


def progress_bar(*extra_columns, bar_width: int = 40, remaining: bool = True) -> Progress:
    """A progress bar on stderr, so ``--json`` output on stdout stays clean.

    A narrower bar and no time-remaining column leave room for live ``extra_columns`` at
    80 columns (rich cuts what does not fit with an ellipsis).
    """
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=bar_width),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        *([TimeRemainingColumn()] if remaining else []),
        *extra_columns,
        console=err_console,
        transient=False,
    )


class TrainingReporter:
    """Rich progress for the training engine: one bar per phase, a line per epoch."""

    def __init__(self):
        self.progress: Progress | None = None
        self.task = None

    def start(self, name: str, total: int, done: int = 0) -> None:
        self.progress = progress_bar(TextColumn("{task.fields[info]}"))
        self.progress.start()
        self.task = self.progress.add_task(name, total=total, completed=done, info="")

    def advance(self, info: dict) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=1, info=f"loss {info['loss']:.3f} lr {info['lr']:.2g}")

    def epoch(self, m: dict) -> None:
        if self.progress is None:
            return
        extra = "".join(f" {k} {m[k]}" for k in ("switched", "shared", "live", "lambda") if k in m)
        test = f" test {m['test_acc']:.2f}%" if "test_acc" in m else ""
        test = f" test mIoU {m['test_miou']:.2f}%" if "test_miou" in m else test
        self.progress.console.print(
            f"  {m['kind']} epoch {m['epoch']}: loss {m['loss']:.4f} train {m['train_acc']:.2f}%{test}{extra}"
        )

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
