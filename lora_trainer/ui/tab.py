"""The Train LoRA tab: ``TrainTab(context).render()`` builds the components, then one ``_wire_*`` method per
behaviour connects them to ``TabController``. Every component's elem_id starts with ``lora_trainer_``.

Progress comes from a hidden Refresh button that ``javascript/lora_trainer.js`` clicks every 1.5 s (no
gr.Timer, no queue needed), so it works in gradio 3.41, 4.40 and current gradio, and after a page reload.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import List

import gradio as gr

from ..errors import UserError
from . import compat
from .compat import make, update
from .context import TabContext
from .controller import BULK_OPS, DatasetView, TabController
from .dataset_panel import DatasetPanel
from .fields import FORM_FIELDS, MAIN_FIELDS, advanced_groups, field_specs, form_values
from .presets import list_presets, load_preset
from .result_panel import ResultPanel
from .widgets import field_component, guarded, thumbnail


class TrainTab:
    def __init__(self, context: TabContext):
        self.context = context
        self.controller = TabController(context)
        self.results = ResultPanel(context, self.controller)

    # -- layout ----------------------------------------------------------------------------------
    # Settings on the left; on the right, sticky (style.css), what a run shows: Status, the buttons, progress, the
    # result, the chart and samples, as the WebUI's own tabs put output beside settings. A narrow window wraps the
    # right column under the left one (each has a min_width).
    def render(self, css: str = "") -> gr.Blocks:
        kwargs = {"css": css} if css and compat.MAJOR < 6 else {}
        with gr.Blocks(analytics_enabled=False, title="Train LoRA", **kwargs) as blocks:
            with make(gr.Row, elem_id="lora_trainer_tab", equal_height=False):
                with make(gr.Column, scale=3, min_width=560, elem_id="lora_trainer_settings"):
                    self._dataset_section()
                    self._model_section()
                    self._training_section()
                with make(gr.Column, scale=2, min_width=440, elem_id="lora_trainer_output"):
                    self.status = make(gr.Textbox, label="Status", interactive=False,
                                       elem_id="lora_trainer_status")
                    self._run_section()
                    self.results.render()
                    self._progress_section()
            self._wire_dataset()
            self._wire_training()
            self._wire_run()
            self.results.wire(self.status)
        self.blocks = blocks
        return blocks

    def _dataset_section(self) -> None:
        """The common path in view (pick or upload a dataset, load, auto-caption, check); the rest folded."""
        gr.Markdown("### Dataset", elem_id="lora_trainer_dataset_heading")
        self.dataset_panel = DatasetPanel(self.controller.datasets)
        self.dataset_panel.render()
        with gr.Row():
            self.folder = make(gr.Textbox, label="Image folder", elem_id="lora_trainer_dataset_dir", scale=4,
                               placeholder="/path/to/images (sub-folders like 10_name repeat 10x)")
            self.load = make(gr.Button, value="Load", elem_id="lora_trainer_dataset_load", scale=1)
            self.trigger = make(gr.Textbox, label="Trigger word", elem_id="lora_trainer_trigger_word", scale=2,
                                value=self.context.defaults.get("trigger_word", ""))
        with make(gr.Accordion, label="Auto-caption (CLIP)", open=True, elem_id="lora_trainer_caption_section"):
            with gr.Row():
                self.cap_model = make(gr.Textbox, label="Caption model (open_clip name or config .json)",
                                      value=self.context.caption_model, elem_id="lora_trainer_caption_model")
                self.cap_pretrained = make(gr.Textbox, label="Pretrained (tag, or a local weights file)",
                                           value=self.context.caption_pretrained,
                                           elem_id="lora_trainer_caption_pretrained")
            with gr.Row():
                self.cap_threshold = make(gr.Slider, minimum=0.0, maximum=0.5, step=0.01, value=0.2,
                                          label="Threshold", elem_id="lora_trainer_caption_threshold")
                self.cap_mode = make(gr.Radio, choices=["skip", "append", "overwrite"], value="skip",
                                     label="Images with a caption", elem_id="lora_trainer_caption_mode")
                self.cap_run = make(gr.Button, value="Auto-caption", elem_id="lora_trainer_caption_run")
        self.warnings = make(gr.Textbox, label="Dataset check", interactive=False, lines=2,
                             elem_id="lora_trainer_dataset_warnings")
        self.gallery = make(gr.Gallery, label="Images and captions", elem_id="lora_trainer_dataset_gallery",
                            columns=6, height=320, allow_preview=False)
        self.names = make(gr.Textbox, label="Image names", elem_id="lora_trainer_dataset_names",
                          elem_classes=["lora_trainer_hidden"])
        with make(gr.Accordion, label="Edit captions and tags", open=False, elem_id="lora_trainer_edit_section"):
            with gr.Row():
                self.image = make(gr.Dropdown, label="Image", choices=[], value=None,
                                  elem_id="lora_trainer_caption_image", scale=2)
                self.caption = make(gr.Textbox, label="Caption", lines=2, elem_id="lora_trainer_caption_text",
                                    scale=5)
                self.save_caption = make(gr.Button, value="Save caption", elem_id="lora_trainer_caption_save",
                                         scale=1)
            with gr.Row():
                self.bulk_op = make(gr.Radio, choices=list(BULK_OPS), value="prepend", label="Tag edit (all images)",
                                    elem_id="lora_trainer_bulk_op")
                self.bulk_tag = make(gr.Textbox, label="Tag", elem_id="lora_trainer_bulk_tag")
                self.bulk_new = make(gr.Textbox, label="Replace with", elem_id="lora_trainer_bulk_replacement")
                self.bulk_apply = make(gr.Button, value="Apply and save", elem_id="lora_trainer_bulk_apply")
        self.dataset_panel.render_management()

    def _model_section(self) -> None:
        gr.Markdown("### Model", elem_id="lora_trainer_model_heading")
        if self.context.webui:
            with gr.Row():
                self.base_model = make(gr.Textbox, label="The WebUI's loaded checkpoint (trained in place)",
                                       value=self.context.model_info or "", interactive=False,  # at page load
                                       elem_id="lora_trainer_model_info", scale=5)
                self.model_refresh = make(gr.Button, value="Refresh", elem_id="lora_trainer_model_refresh")
        else:
            self.base_model = make(gr.Textbox, label="Base checkpoint (.safetensors / .ckpt file or diffusers "
                                   "folder)", value=self.context.defaults.get("base_model", ""),
                                   elem_id="lora_trainer_base_model")

    def _training_section(self) -> None:
        gr.Markdown("### Training", elem_id="lora_trainer_training_heading")
        defaults = {"output_dir": str(self.context.output_dir), **self.context.defaults}
        with gr.Row():
            self.preset = make(gr.Dropdown, choices=list_presets(), value=None, label="Preset",
                               elem_id="lora_trainer_preset")
            self.preset_apply = make(gr.Button, value="Apply preset", elem_id="lora_trainer_preset_apply")
        self.fields = {}
        main = field_specs(MAIN_FIELDS, defaults)
        for row in (main[:4], main[4:]):
            with gr.Row():
                for spec in row:
                    self.fields[spec.name] = field_component(spec)
        with make(gr.Accordion, label="Advanced", open=False, elem_id="lora_trainer_advanced"):
            for group, names in advanced_groups():
                with make(gr.Accordion, label=group, open=False,
                          elem_id=f"lora_trainer_advanced_{group.split()[0].lower()}"):
                    specs = field_specs(names, defaults)
                    for start in range(0, len(specs), 3):
                        with gr.Row():
                            for spec in specs[start:start + 3]:
                                self.fields[spec.name] = field_component(spec)
        with gr.Row():
            self.estimate_run = make(gr.Button, value="Estimate time and memory", elem_id="lora_trainer_estimate_btn")
            self.estimate = make(gr.Textbox, label="Estimate", interactive=False, elem_id="lora_trainer_estimate",
                                 scale=4)
        with gr.Row():
            self.yaml_in = make(gr.File, label="Config YAML to load", file_types=[".yaml", ".yml"],
                                elem_id="lora_trainer_yaml_upload")
            self.yaml_load = make(gr.Button, value="Load YAML", elem_id="lora_trainer_yaml_load")
            self.yaml_save = make(gr.Button, value="Save YAML", elem_id="lora_trainer_yaml_save")
            self.yaml_out = make(gr.File, label="Saved config", interactive=False, elem_id="lora_trainer_yaml_file")
        gr.Markdown("Several GPUs: this tab trains in one process. *Save YAML*, then run "
                    "`torchrun --nproc_per_node 2 -m lora_trainer train --config name.yaml` (or `accelerate launch "
                    "--multi_gpu ...`); `batch_size` is per GPU.",
                    elem_id="lora_trainer_multi_gpu")

    def _run_section(self) -> None:
        with gr.Row():
            self.start = make(gr.Button, value="Start", variant="primary", elem_id="lora_trainer_start")
            self.stop = make(gr.Button, value="Stop", elem_id="lora_trainer_stop")
            self.stop_save = make(gr.Button, value="Stop and save", elem_id="lora_trainer_stop_save")
        with gr.Row():
            self.extend_steps = make(gr.Number, value=100, precision=0, label="Extend by N steps",
                                     elem_id="lora_trainer_extend_steps", scale=2)
            self.extend = make(gr.Button, value="Extend", elem_id="lora_trainer_extend", scale=1)
        self.progress = make(gr.Textbox, label="Progress", interactive=False, lines=2,
                             elem_id="lora_trainer_progress")

    def _progress_section(self) -> None:
        with gr.Row():
            self.chart = make(gr.LinePlot, x="step", y="loss", color="series", title="Training loss",
                              x_title="step", y_title="loss", height=220, elem_id="lora_trainer_loss_chart")
        self.samples = make(gr.Gallery, label="Latest samples", elem_id="lora_trainer_samples", columns=4,
                            height=200, allow_preview=False)
        with make(gr.Accordion, label="Log", open=False, elem_id="lora_trainer_log_section"):
            self.log = make(gr.Textbox, label="Log", lines=6, max_lines=12, interactive=False,
                            elem_id="lora_trainer_log")
        self.refresh = make(gr.Button, value="Refresh", elem_id="lora_trainer_refresh",
                            elem_classes=["lora_trainer_hidden"])
        self.seen = gr.State({})

    # -- wiring ----------------------------------------------------------------------------------
    def _dataset_outputs(self, view: DatasetView, caption_name: str = "") -> tuple:
        gallery = [t for t in (thumbnail(p, c) for p, c in view.gallery) if t is not None]
        name = caption_name if caption_name in view.names else (view.names[0] if view.names else None)
        caption = dict(zip(view.names, (c for _, c in view.gallery))).get(name, "")
        return (gallery, view.warnings_text, "\n".join(view.names), update(choices=view.names, value=name),
                caption)

    def _wire_dataset(self) -> None:
        c = self.controller
        outputs = [self.status, self.gallery, self.warnings, self.names, self.image, self.caption]

        @guarded(len(outputs))
        def load(folder):
            view = c.load_dataset(folder)
            return (f"loaded {len(view.names)} images from {view.root}",) + self._dataset_outputs(view)

        @guarded(len(outputs))
        def caption(folder, model, pretrained, threshold, mode, trigger):
            view, message = c.caption(folder, model, pretrained, threshold, mode, trigger)
            return (message,) + self._dataset_outputs(view)

        @guarded(len(outputs))
        def save(folder, name, text):
            view, message = c.save_caption(folder, name, text)
            return (message,) + self._dataset_outputs(view, name)

        @guarded(len(outputs))
        def bulk(folder, op, tag, new, name):
            view, message = c.bulk_edit(folder, op, tag, new)
            return (message,) + self._dataset_outputs(view, name)

        def caption_of(folder, name):
            try:
                view = c.load_dataset(folder)
            except UserError:
                return ""
            return dict(zip(view.names, (cap for _, cap in view.gallery))).get(name, "")

        def select_image(folder, names, evt: gr.SelectData):
            names = (names or "").splitlines()
            index = evt.index if isinstance(evt.index, int) else evt.index[0]
            if not 0 <= index < len(names):
                return update(), update()
            return update(value=names[index]), caption_of(folder, names[index])

        def choose_image(folder, evt: gr.SelectData):
            return caption_of(folder, evt.value)

        self.load.click(load, [self.folder], outputs)
        self.folder.submit(load, [self.folder], outputs)
        self.cap_run.click(caption, [self.folder, self.cap_model, self.cap_pretrained, self.cap_threshold,
                                     self.cap_mode, self.trigger], outputs)
        self.save_caption.click(save, [self.folder, self.image, self.caption], outputs)
        self.bulk_apply.click(bulk, [self.folder, self.bulk_op, self.bulk_tag, self.bulk_new, self.image], outputs)
        # select, not change: a programmatic value must not load a caption over the one being edited
        self.gallery.select(select_image, [self.folder, self.names], [self.image, self.caption])
        self.image.select(choose_image, [self.folder], [self.caption])
        self.dataset_panel.wire(self.status, self.folder, outputs[1:], self._shown_dataset)

    def _shown_dataset(self, folder: str) -> tuple:
        """The gallery, warnings, names, image list and caption for a folder; an empty dataset shows nothing."""
        if not folder:
            return [], "", "", update(choices=[], value=None), ""
        try:
            return self._dataset_outputs(self.controller.load_dataset(folder))
        except UserError as exc:
            return [], f"Warning: {exc}", "", update(choices=[], value=None), ""

    def _form(self) -> List:
        return [self.folder, self.base_model, self.trigger] + [self.fields[n] for n in FORM_FIELDS]

    def _config(self, folder, base_model, trigger, *values):
        return self.controller.build_config(folder, base_model, trigger, dict(zip(FORM_FIELDS, values)))

    def _wire_training(self) -> None:
        c = self.controller
        fields = [self.fields[n] for n in FORM_FIELDS]
        if self.context.webui:  # the loaded checkpoint's name and family, read again
            self.model_refresh.click(lambda: self.context.base_model_label, None, [self.base_model])

        @guarded(1 + len(fields))
        def apply_preset(name):
            if not name:
                raise UserError("choose a preset first")
            values = load_preset(name)
            return (f"preset {name}: set {', '.join(values)}",) + tuple(
                update(value=v) if n in values else update()
                for n, v in zip(FORM_FIELDS, form_values(self._with(values), FORM_FIELDS)))

        @guarded(2)
        def estimate(*form):
            return "", c.estimate(self._config(*form))

        @guarded(2)
        def save_yaml(*form):
            config = self._config(*form)
            path = Path(tempfile.mkdtemp(prefix="lora_trainer_")) / f"{config.output_name or 'lora'}.yaml"
            path.write_text(c.config_yaml(config), encoding="utf-8")
            return f"config saved as {path.name}", str(path)

        form_outputs = [self.status, self.folder, self.base_model, self.trigger] + fields

        @guarded(len(form_outputs))
        def load_yaml(file):
            path = compat.file_path(file)
            if not path:
                raise UserError("choose a YAML file to load first")
            values = c.read_yaml(Path(path).read_text(encoding="utf-8"), Path(path).name)
            config = self._with(values)
            base = update(value=config.base_model) if "base_model" in values and not self.context.webui else update()
            return ((f"loaded {Path(path).name}", update(value=values.get("train_data_dir", "")) if
                     "train_data_dir" in values else update(), base,
                     update(value=config.trigger_word) if "trigger_word" in values else update())
                    + tuple(update(value=v) for v in form_values(config, FORM_FIELDS)))

        self.preset_apply.click(apply_preset, [self.preset], [self.status] + fields)
        self.estimate_run.click(estimate, self._form(), [self.status, self.estimate])
        self.yaml_save.click(save_yaml, self._form(), [self.status, self.yaml_out])
        self.yaml_load.click(load_yaml, [self.yaml_in], form_outputs)

    def _wire_run(self) -> None:
        c = self.controller

        @guarded(2)
        def start(*form):
            config = self._config(*form)
            estimate = ""
            try:
                estimate = c.estimate(config)
            except UserError:
                pass  # start() names the problem
            return c.start(config), estimate or update()

        self.start.click(start, self._form(), [self.status, self.estimate])
        self.stop.click(guarded(1)(lambda: c.stop(save=False)), None, [self.status])
        self.stop_save.click(guarded(1)(lambda: c.stop(save=True)), None, [self.status])
        self.extend.click(guarded(1)(c.extend), [self.extend_steps], [self.status])

        outputs = [self.progress, self.chart, self.samples, self.log, self.seen, self.status]
        result_outputs = self.results.components()

        def refresh(seen):
            view = c.progress()
            seen = dict(seen or {})
            if view.fingerprint == seen.get("fingerprint"):
                return (update(),) * 4 + (seen, update()) + tuple(update() for _ in result_outputs)
            # Status tells the run's state whenever it changes (queued, running, finished, failed, also after a page
            # reload); between changes it keeps the last message (captions saved, dataset loaded, ...).
            status = update()
            if view.state != seen.get("state") and view.state != "idle":
                status = view.status
            seen["state"] = view.state
            chart = _loss_frame(view.losses, view.val_losses) if view.losses else None
            samples = update()
            if len(view.samples) != seen.get("samples"):
                samples = [t for t in (thumbnail(p, Path(p).stem) for p in view.samples[-8:][::-1]) if t]
            result = tuple(update() for _ in result_outputs)
            done = view.state in ("finished", "stopped") and view.run_dir
            if done and seen.get("result") != view.fingerprint[:2]:
                try:
                    result = self.results.outputs(c.result(view.run_dir))
                    seen["result"] = view.fingerprint[:2]
                except UserError as exc:
                    result = (str(exc),) + tuple(update() for _ in result_outputs[1:])
            seen.update(fingerprint=view.fingerprint, samples=len(view.samples))
            return (view.summary, chart, samples, view.log, seen, status) + result

        self.refresh.click(refresh, [self.seen], outputs + result_outputs, queue=False, **compat.hidden_progress())

    def _with(self, values: dict):
        """A full config for the form: ``values``, and the tab's defaults (its output folder, settings) elsewhere."""
        from ..config import TrainConfig

        defaults = {"base_model": "-", "train_data_dir": "-", "output_dir": str(self.context.output_dir),
                    **self.context.defaults}
        return TrainConfig.from_dict({**defaults, **values}, source="form")

def _loss_frame(losses, val_losses=()):
    """The chart's points: the training loss, and the validation loss where it was measured, as two series."""
    import pandas as pd

    points = [(s, v, "training") for s, v in losses] + [(s, v, "validation") for s, v in val_losses]
    return pd.DataFrame({"step": [p[0] for p in points], "loss": [p[1] for p in points],
                         "series": [p[2] for p in points]})
