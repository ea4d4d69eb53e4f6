"""The named datasets of the tab's Dataset panel: pick one from the list, create one, drop files into it, rename or
delete it. ``TrainTab`` renders it at the top of its Dataset section and wires it to its folder box and gallery:
picking, creating or filling a dataset puts its folder in the box and loads it, as if the path had been typed.
The work is ``DatasetManager``'s (plain Python); uploads use gradio's own upload and its progress.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, List

import gradio as gr

from . import compat
from .compat import make, update
from .dataset_manager import DatasetManager, DatasetsView
from .widgets import guarded


class DatasetPanel:
    def __init__(self, manager: DatasetManager):
        self.manager = manager

    def render(self) -> None:
        with gr.Row():
            self.choice = make(gr.Dropdown, label="Dataset (images, captioned)", choices=self.manager.choices(),
                               value=None, elem_id="lora_trainer_dataset_choice", scale=4)
            self.list_refresh = make(gr.Button, value="Refresh list", elem_id="lora_trainer_dataset_list_refresh")
            self.new_name = make(gr.Textbox, label="New dataset", placeholder="name",
                                 elem_id="lora_trainer_dataset_new_name", scale=2)
            self.create = make(gr.Button, value="Create", elem_id="lora_trainer_dataset_create")
        with gr.Row():
            self.upload = make(gr.File, label="Add images with .txt captions or a metadata.csv, or a .zip",
                               file_count="multiple", elem_id="lora_trainer_dataset_upload", scale=3)
            with gr.Column(scale=2):
                self.report = make(gr.Textbox, label="Upload report", interactive=False, lines=4, max_lines=12,
                                   elem_id="lora_trainer_upload_report")
                self.cancel = make(gr.Button, value="Cancel upload", size="sm", elem_id="lora_trainer_upload_cancel")

    def render_management(self) -> None:
        """Rename and delete, folded away under the rest of the dataset section."""
        with make(gr.Accordion, label="Rename or delete the dataset", open=False,
                  elem_id="lora_trainer_dataset_manage"):
            with gr.Row():
                self.rename_to = make(gr.Textbox, label="Rename the dataset to",
                                      elem_id="lora_trainer_dataset_rename_to")
                self.rename = make(gr.Button, value="Rename", elem_id="lora_trainer_dataset_rename")
            with gr.Row():
                self.confirm = make(gr.Textbox, label="Type the dataset's name to delete it",
                                    elem_id="lora_trainer_dataset_delete_confirm")
                self.delete = make(gr.Button, value="Delete dataset", variant="stop",
                                   elem_id="lora_trainer_dataset_delete")

    def wire(self, status, folder, dataset_outputs: List, show: Callable[[str], tuple]) -> None:
        """``dataset_outputs``: the tab's components that show a dataset; ``show(folder)``: their values."""
        m = self.manager
        outputs = [status, self.choice, folder, self.report, self.rename_to, self.confirm] + list(dataset_outputs)

        def values(view: DatasetsView) -> tuple:
            shown = show(view.folder) if view.folder is not None else tuple(update() for _ in dataset_outputs)
            return ((view.message, update(choices=view.choices, value=view.selected),
                     update() if view.folder is None else view.folder,
                     update() if view.report is None else view.report, "", "") + shown)

        @guarded(len(outputs))
        def pick(evt: gr.SelectData):
            return values(m.select(evt.value))

        @guarded(len(outputs))
        def create(name):
            return values(m.create(name))

        @guarded(len(outputs))
        def upload(choice, files):
            paths = [compat.file_path(f) for f in (files or [])]
            return values(m.upload(choice, [(Path(p).name, Path(p)) for p in paths if p]))

        @guarded(len(outputs))
        def rename(choice, new_name, current):
            return values(m.rename(choice, new_name, current))

        @guarded(len(outputs))
        def delete(choice, confirm, current):
            return values(m.delete(choice, confirm, current))

        def refresh(choice):
            view = m.refresh(choice)
            return update(choices=view.choices, value=view.selected)

        self.choice.select(pick, None, outputs)
        self.list_refresh.click(refresh, [self.choice], [self.choice])
        self.create.click(create, [self.new_name], outputs)
        self.new_name.submit(create, [self.new_name], outputs)
        # The dropped files are cleared once handled, so the next drop starts from an empty box.
        self.upload.upload(upload, [self.choice, self.upload], outputs).then(lambda: None, None, [self.upload])
        # Outside the queue: a click must reach the server while the upload itself holds a queue worker.
        self.cancel.click(guarded(1)(m.cancel_upload), None, [status], queue=False)
        self.rename.click(rename, [self.choice, self.rename_to, folder], outputs)
        self.delete.click(delete, [self.choice, self.confirm, folder], outputs)
