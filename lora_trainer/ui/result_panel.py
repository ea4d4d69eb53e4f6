"""The tab's Result panel: the trained file, its strength sweep, "Use in txt2img" (WebUI) or a Try prompt
(standalone), past runs with their config, and downloads of the LoRA and of the run folder as a .zip."""

from __future__ import annotations

from typing import List

import gradio as gr

from ..errors import UserError
from . import compat
from .compat import make, update
from .context import TabContext
from .controller import ResultView, TabController
from .widgets import guarded


class ResultPanel:
    def __init__(self, context: TabContext, controller: TabController):
        self.context, self.controller = context, controller

    def render(self) -> None:
        gr.Markdown("### Result", elem_id="lora_trainer_result_heading")
        self.result = make(gr.Textbox, label="LoRA file", interactive=False, lines=2, elem_id="lora_trainer_result")
        self.sweep = make(gr.Image, label="Strength sweep", interactive=False, visible=False,
                          elem_id="lora_trainer_sweep")
        self.result_name = make(gr.Textbox, label="LoRA name", elem_id="lora_trainer_result_name",
                                elem_classes=["lora_trainer_hidden"])
        self.result_trigger = make(gr.Textbox, label="Trigger", elem_id="lora_trainer_result_trigger",
                                   elem_classes=["lora_trainer_hidden"])
        self.result_dir = make(gr.Textbox, label="Run folder", elem_id="lora_trainer_result_dir",
                               elem_classes=["lora_trainer_hidden"])
        with gr.Row():
            self.weight = make(gr.Slider, minimum=0.0, maximum=2.0, step=0.05, value=self.context.preferred_weight,
                               label="Weight", elem_id="lora_trainer_weight")
            if self.context.webui:
                self.use = make(gr.Button, value="Use in txt2img", variant="primary",
                                elem_id="lora_trainer_use_txt2img")
            else:
                self.try_prompt = make(gr.Textbox, label="Try prompt", elem_id="lora_trainer_try_prompt", scale=3)
                self.try_run = make(gr.Button, value="Generate", elem_id="lora_trainer_try_run")
        if not self.context.webui:
            self.try_image = make(gr.Image, label="Try", interactive=False, elem_id="lora_trainer_try_image",
                                  height=256)
        with gr.Row():
            self.runs = make(gr.Dropdown, label="Past runs", choices=self.controller.runs(), value=None,
                             elem_id="lora_trainer_runs", scale=4)
            self.runs_refresh = make(gr.Button, value="Refresh list", elem_id="lora_trainer_runs_refresh")
        with gr.Row():
            self.download_lora = make(gr.Button, value="Download the LoRA (.safetensors)",
                                      elem_id="lora_trainer_download_lora")
            self.download_zip = make(gr.Button, value="Download the run folder (.zip: samples, config, metrics)",
                                     elem_id="lora_trainer_download_zip")
            self.download = make(gr.File, label="Download", interactive=False, elem_id="lora_trainer_download_file",
                                 scale=2)
        self.run_config = make(gr.Code, label="Run config", language="yaml", interactive=False,
                               elem_id="lora_trainer_run_config")


    def components(self) -> List:
        """What ``outputs`` fills, in its order (the tab's progress refresh fills them too)."""
        return [self.result, self.sweep, self.result_name, self.result_trigger, self.result_dir, self.weight]

    def outputs(self, view: ResultView) -> tuple:
        sweep = update(value=str(view.sweep), visible=True) if view.sweep else update(value=None, visible=False)
        return (view.text, sweep, view.name, view.trigger, view.run_dir, view.weight)

    def wire(self, status) -> None:
        c = self.controller
        result_outputs = self.components()

        @guarded(2 + len(result_outputs))
        def show_run(name):
            if not name:
                return ("", "") + tuple(update() for _ in result_outputs)
            return ("", c.run_config_text(name)) + self.outputs(c.result(str(c.run_path(name))))

        self.runs.change(show_run, [self.runs], [status, self.run_config] + result_outputs)
        self.runs_refresh.click(lambda: update(choices=c.runs()), None, [self.runs])

        @guarded(2)
        def download(what, run_dir):
            path = c.downloads.lora_file(run_dir) if what == "lora" else c.downloads.run_zip(run_dir)
            return f"{path.name} is ready: click the ⇣ link under Download to save it", str(path)

        self.download_lora.click(lambda run_dir: download("lora", run_dir), [self.result_dir],
                                 [status, self.download])
        self.download_zip.click(lambda run_dir: download("zip", run_dir), [self.result_dir],
                                [status, self.download])
        if self.context.webui:
            self.use.click(None, [self.result_name, self.weight, self.result_trigger], None,
                           **compat.js("(name, weight, trigger) => { loraTrainerUseInTxt2img(name, weight, trigger);"
                                       " return [name, weight, trigger]; }"))
        else:
            @guarded(2)
            def try_lora(run_dir, prompt, weight):
                if not run_dir:
                    raise UserError("no LoRA yet: train one, or choose a past run")
                image, message = c.try_lora(run_dir, prompt, weight)
                return message, image

            self.try_run.click(try_lora, [self.result_dir, self.try_prompt, self.weight],
                               [status, self.try_image])
