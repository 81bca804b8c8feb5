"""Console progress for long steps (compiles): a live spinner with the elapsed time while a step
runs, on a terminal, and one plain line when it ends (logs and pipes get only the plain lines).

    with Steps(Console(stderr=True)) as steps:
        steps.start("cpu: compiling (llvm-cpu)")
        ...
        steps.done("cpu: compiled in 12.3 s")
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

__all__ = ["Steps"]


class Steps:
    """One live step at a time: `start(text)` shows `⠋ text 0:00:07`, `done(line)` replaces it by a
    permanent line (or by nothing). A `Steps` that is not entered, or made with `enabled=False`,
    prints only the `done` lines (none when disabled)."""

    def __init__(self, console: Console | None = None, *, enabled: bool = True):
        self.console = console or Console()
        self.enabled = enabled
        self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                  console=self.console, transient=True)
        self._task: TaskID | None = None
        self._live = False

    def __enter__(self) -> "Steps":
        if self.enabled and self.console.is_terminal:
            self._progress.start()
            self._live = True
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._clear()
        if self._live:
            self._progress.stop()
            self._live = False

    def start(self, text: str) -> None:
        """Show `text` with a spinner and the time since now (replacing the step before)."""
        self._clear()
        if self._live:
            self._task = self._progress.add_task(text, total=None)

    def done(self, line: str | None = None, **print_args: Any) -> None:
        """End the live step; print `line` for good."""
        self._clear()
        if line is not None and self.enabled:
            self.console.print(line, highlight=False, markup=False, soft_wrap=True, **print_args)

    def _clear(self) -> None:
        if self._task is not None:
            self._progress.remove_task(self._task)
            self._task = None
