"""The tab's named datasets, in plain Python: the list's labels, create, upload into, rename, delete.

The files land in ``TabContext.datasets_dir`` (one folder per dataset) under ``DatasetStore``'s rules (real images
and caption files only, size caps, zip-slip refused, safe names, all or nothing). Every action returns a
``DatasetsView`` that ``dataset_panel.py`` turns into component updates, or raises ``UserError`` with one line.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

from .. import job as jobs
from ..dataset_store import DatasetInfo, DatasetStore, UploadReport
from ..errors import DatasetError, UserError
from .context import TabContext

SEPARATOR = " — "  # between a dataset's name and its counts in the list; no dataset name can contain it
_LISTED = 10
CANCEL_WAIT_S = 60  # how long Cancel waits for the running upload to roll back before it answers


@dataclass
class DatasetsView:
    choices: List[str]  # the list's labels ("name — 12 images, 10 captioned (83%)")
    selected: Optional[str]  # the selected label; None: nothing selected
    folder: Optional[str]  # the folder box's new value ("" empties it); None: leave it as it is
    message: str  # one line for the status box
    report: Optional[str] = None  # the upload report (a line per refused file); None: leave it as it is


def dataset_label(info: DatasetInfo) -> str:
    if not info.images:
        return f"{info.name}{SEPARATOR}empty"
    return (f"{info.name}{SEPARATOR}{info.images} images, {info.captioned} captioned "
            f"({round(100 * info.coverage)}%)")


def report_text(report: UploadReport) -> str:
    """The upload report: what was added, then one line per refused file with its reason."""
    added = ", ".join(report.added[:_LISTED]) + (f" and {len(report.added) - _LISTED} more"
                                                  if len(report.added) > _LISTED else "")
    lines = [f"added {len(report.added)} file(s)" + (f": {added}" if added else "")]
    lines += [f"refused {name}: {why}" for name, why in report.refused]
    return "\n".join(lines)


class DatasetManager:
    def __init__(self, context: TabContext):
        self.context = context
        # Cancel reaches a running upload through these (one tab, one person: a cancel stops every running upload).
        self._cancel = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._outcome = ""

    @property
    def store(self) -> DatasetStore:
        if self.context.datasets_dir is None:
            raise UserError("no datasets folder is set up here; type the path of an image folder instead")
        return DatasetStore(Path(self.context.datasets_dir), self.context.upload_limits)

    def choices(self) -> List[str]:
        try:
            return [dataset_label(info) for info in self.store.list()]
        except UserError:
            return []

    @staticmethod
    def name_of(choice: Optional[str]) -> str:
        name = (choice or "").split(SEPARATOR)[0].strip()
        if not name:
            raise UserError("choose a dataset from the list, or create one, first")
        return name

    def view(self, name: Optional[str], message: str, folder: Optional[str] = None,
             report: Optional[str] = None) -> DatasetsView:
        """The list with ``name`` selected (its label carries fresh counts)."""
        store = self.store
        infos = store.list()
        selected = next((dataset_label(i) for i in infos if i.name == name), None)
        return DatasetsView([dataset_label(i) for i in infos], selected, folder, message, report)

    def refresh(self, choice: Optional[str]) -> DatasetsView:
        name = (choice or "").split(SEPARATOR)[0].strip() or None
        return self.view(name, "")

    def select(self, choice: Optional[str]) -> DatasetsView:
        name = self.name_of(choice)
        folder = self.store.path(name)
        return self.view(name, f"dataset {name}: {folder}", folder=str(folder))

    def create(self, name: str) -> DatasetsView:
        folder = self.store.create((name or "").strip())
        return self.view(folder.name, f"created dataset {folder.name}: now drop images, captions or a .zip into it",
                         folder=str(folder), report="")

    def upload(self, choice: Optional[str], files: Iterable[Tuple[str, Path]]) -> DatasetsView:
        """Add uploaded files ``(name as sent, temporary path)`` to the chosen dataset; ``cancel_upload`` stops
        it (between files and zip entries) and nothing is added."""
        files = iter(files)
        first = next(files, None)
        if first is None:
            raise UserError("drop images, .txt captions, a metadata.csv or a .zip to add")
        name = self.name_of(choice)
        self._cancel.clear()
        self._idle.clear()
        self._outcome = "cancelled: nothing was added"
        try:
            report = self.store.add_files(name, itertools.chain([first], files), cancelled=self._cancel.is_set)
            self._outcome = f"came too late: the upload had finished ({report.message()})"
        finally:
            self._idle.set()
        return self.view(name, f"{name}: {report.message()}", folder=str(self.store.path(name)),
                         report=report_text(report))

    def cancel_upload(self) -> str:
        """Stop the running upload and say what became of it (one line for the status box)."""
        if self._idle.is_set():
            return "no upload is running; nothing to cancel"
        self._cancel.set()
        if not self._idle.wait(CANCEL_WAIT_S):
            return f"cancel asked; the upload is still rolling back after {CANCEL_WAIT_S} s"
        return f"upload {self._outcome}"

    def rename(self, choice: Optional[str], new_name: str, folder: str) -> DatasetsView:
        name = self.name_of(choice)
        source = self.store.path(name)
        self._refuse_while_training(source, "renamed")
        target = self.store.rename(name, (new_name or "").strip())
        moved = _same(folder, source)
        return self.view(target.name, f"renamed dataset {name} to {target.name}",
                         folder=str(target) if moved else None)

    def delete(self, choice: Optional[str], confirm: str, folder: str) -> DatasetsView:
        name = self.name_of(choice)
        source = self.store.path(name)
        self._refuse_while_training(source, "deleted")
        self.store.delete(name, (confirm or "").strip())
        return self.view(None, f"deleted dataset {name} and its files", folder="" if _same(folder, source) else None,
                         report="")

    @staticmethod
    def _refuse_while_training(folder: Path, what: str) -> None:
        job = jobs.current_job()
        if job is not None and job.state in jobs.ACTIVE and _same(job.config.train_data_dir, folder):
            raise DatasetError(f"dataset {folder.name} is being trained on; it can be {what} when the run has "
                               "finished")


def _same(path: Optional[str], folder: Path) -> bool:
    if not path or not str(path).strip():
        return False
    try:
        return Path(str(path).strip()).expanduser().resolve() == folder.resolve()
    except OSError:
        return False
