"""A stand-in of AUTOMATIC1111 1.10 assembling its UI around an extension, for the browser test of the tab.

``python fake_webui.py EXTENSION_DIR PORT``: imports the extension's scripts/*.py as ``scripts.load_scripts``
does (extension dir on sys.path while importing), runs the settings and ui_tabs callbacks, renders the tabs
after a txt2img tab holding ``#txt2img_prompt`` (``modules/ui.py:create_ui``) and before a Settings tab built by
A1111's widget rule (``modules/ui_settings.py``), injects javascript/*.js and
style.css into the page (``ui_gradio_extensions.reload_javascript``), serves it with the queue on and gives the
extensions the FastAPI app (``on_app_started``).
"""

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load_scripts(extension: Path) -> None:
    for path in sorted((extension / "scripts").glob("*.py")):
        sys.path.insert(0, str(extension))
        try:
            spec = importlib.util.spec_from_file_location(f"extension_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(extension))


def reload_javascript(extension: Path) -> None:
    import gradio as gr

    scripts = [HERE / "script.js"] + sorted((extension / "javascript").glob("*.js"))
    head = "".join(f"<script type=\"text/javascript\">{p.read_text(encoding='utf-8')}</script>\n" for p in scripts)
    css = f"<style>{(extension / 'style.css').read_text(encoding='utf-8')}</style>"
    original = gr.routes.templates.TemplateResponse

    def template_response(*args, **kwargs):
        res = original(*args, **kwargs)
        res.body = res.body.replace(b"</head>", f"{head}</head>".encode())
        res.body = res.body.replace(b"</body>", f"{css}</body>".encode())
        res.init_headers()
        return res

    gr.routes.templates.TemplateResponse = template_response


def main(extension: Path, port: int) -> None:
    import gradio as gr
    from modules import script_callbacks, ui_settings

    load_scripts(extension)
    script_callbacks.ui_settings_callback()
    interfaces = script_callbacks.ui_tabs_callback()
    reload_javascript(extension)
    with gr.Blocks(analytics_enabled=False, title="Stable Diffusion") as demo:
        with gr.Tabs(elem_id="tabs"):
            with gr.TabItem("txt2img", id="txt2img", elem_id="tab_txt2img"):
                gr.Textbox(label="Prompt", elem_id="txt2img_prompt", lines=3)
            for interface, label, ifid in interfaces:
                with gr.TabItem(label, id=ifid, elem_id=f"tab_{ifid}"):
                    interface.render()
            with gr.TabItem("Settings", id="settings", elem_id="tab_settings"):
                ui_settings.create_settings_page()  # raises, as the real page does, for an option it cannot show
    demo.queue(64)
    # webui.py:webui(): launch without blocking, then the extensions' on_app_started callbacks get the FastAPI app.
    app, _, _ = demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True)
    script_callbacks.app_started_callback(demo, app)
    demo.block_thread()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
