"""A job's progress on the terminal (rich): answered items of the total, rate and ETA, and the
state. Disabled, it does nothing, so callers need no branch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

if TYPE_CHECKING:
    from fmserve.client import JobStatus


class JobProgress:
    def __init__(self, enabled: bool = True, description: str = "job") -> None:
        self.enabled = enabled
        self.description = description
        self._progress: Progress | None = None
        self._task: Any = None

    def __enter__(self) -> JobProgress:
        if self.enabled:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TaskProgressColumn(),
                TextColumn("[cyan]{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[state]}"),
            )
            self._progress.start()
            self._task = self._progress.add_task(self.description, total=None, rate="", state="")
        return self

    def update(self, status: JobStatus) -> None:
        if self._progress is None:
            return
        task = self._progress.tasks[0]
        rate = f"{task.speed:,.0f} items/s" if task.speed else ""
        failed = f" ({status.failed} failed)" if status.failed else ""
        self._progress.update(
            self._task,
            completed=status.answered,
            total=status.total if status.sealed else None,
            rate=rate,
            state=status.state + failed,
        )

    def __exit__(self, *exc_info: object) -> None:
        if self._progress is not None:
            self._progress.stop()
