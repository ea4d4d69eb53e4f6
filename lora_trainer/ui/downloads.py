"""Files the Result panel hands to the browser: the trained .safetensors and a .zip of the run folder.

gradio serves a file output only from its allowed folders (gradio 4+ refuses others, and the WebUI's launch
options are not ours to change); the system's temporary folder is allowed in gradio 3.41, 4.40 and current
gradio alike. So each download is a hard link (or a copy, across file systems) or a fresh .zip in a private
folder there, of which only the latest few are kept: gradio copies a returned file into its own cache anyway.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from .. import job as jobs
from ..dataset_store import zip_run_folder
from ..errors import UserError
from ..run_folder import RunFolder

KEEP = 4  # downloads kept in the temporary folder (a slow browser may still be fetching an older one)


class Downloads:
    def __init__(self, output_dir: Path):
        self.output_dir = Path(output_dir)
        self._root: Optional[Path] = None

    def lora_file(self, run_dir: str) -> Path:
        run = self._run(run_dir)
        if not run.lora_path.is_file():
            raise UserError(f"{run.name} has no LoRA file (stopped without saving, or still training)")
        target = self._fresh_folder() / run.lora_path.name
        try:
            os.link(run.lora_path, target)  # the file is replaced atomically, never rewritten: a link is a snapshot
        except OSError:
            shutil.copyfile(run.lora_path, target)
        return target

    def run_zip(self, run_dir: str) -> Path:
        run = self._run(run_dir)
        return zip_run_folder(run.path, self._fresh_folder() / f"{run.name}.zip")

    def _run(self, run_dir: str) -> RunFolder:
        """The run folder, if it is one the tab shows: in its output folder, or the current job's."""
        if not (run_dir or "").strip():
            raise UserError("no run to download yet: train one, or choose a past run")
        path = Path(run_dir.strip()).expanduser().resolve()
        job = jobs.current_job()
        current = job.run_dir.resolve() if job is not None and job.run_dir is not None else None
        if path != current and self.output_dir.resolve() not in path.parents:
            raise UserError(f"{run_dir} is not a run folder of this tab ({self.output_dir})")
        return RunFolder.open_existing(path)

    def _fresh_folder(self) -> Path:
        if self._root is None or not self._root.is_dir():
            self._root = Path(tempfile.mkdtemp(prefix="lora_trainer_downloads_"))
        old = sorted(self._root.iterdir(), key=lambda p: p.stat().st_mtime)
        for folder in old[:max(0, len(old) - KEEP + 1)]:
            shutil.rmtree(folder, ignore_errors=True)
        return Path(tempfile.mkdtemp(dir=self._root))
