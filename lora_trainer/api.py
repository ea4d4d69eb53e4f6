"""HTTP API: start, watch, stop, extend and fetch trainings from scripts, under ``/lora-trainer/v1``.

Mounted on the WebUI's FastAPI app (``script_callbacks.on_app_started``, also under ``--nowebui``) and on
the standalone app. Bodies are plain JSON in the same schema as the YAML files; answers are plain JSON.
Only plain ``dict`` bodies and ``JSONResponse`` are used, so the routes work with A1111's FastAPI 0.94 /
pydantic 1 and Forge's FastAPI 0.104 / pydantic 2 alike.
"""

from __future__ import annotations

import base64
import binascii
import logging
import secrets
import shutil
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Union

from .config import TrainConfig, is_safe_name
from .errors import ConfigError, DatasetError, ModelError, UserError
from .host import Host
from .job import JobBusy, JobNotExtendable, get_job, start_job
from .run_folder import RunFolder

logger = logging.getLogger("lora_trainer")

PREFIX = "/lora-trainer/v1"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class PathRules:
    """Folders the API may read datasets from and write runs and uploads to."""

    def __init__(self, roots: Iterable[Path], output_dir: Path, upload_dir: Path, upload_limits=None):
        self.roots = [Path(r).resolve() for r in roots]
        self.output_dir, self.upload_dir = Path(output_dir), Path(upload_dir)
        self.upload_limits = upload_limits  # dataset_store.UploadLimits for images sent in a body; None: defaults

    def check(self, value: str, field: str) -> Path:
        path = Path(value).expanduser().resolve()
        if not any(path == root or root in path.parents for root in self.roots):
            raise ApiError(403, f"'{field}': {value} is outside the folders this server allows "
                                f"({', '.join(str(r) for r in self.roots)}); change the LoRA Trainer settings "
                                "to allow it")
        return path


# Paths a request may name besides train_data_dir: each must lie in the allowed folders (cache_dir and logging_dir
# are written to).
PATH_KEYS = ("metadata_path", "init_lora", "reg_data_dir", "validation_data_dir", "mask_dir", "dataset_config",
             "cache_dir", "logging_dir")


def _check_layout_paths(config: TrainConfig, rules: PathRules) -> None:
    """Every folder and file the run will read, also those named inside ``subsets`` or a kohya dataset config."""
    from .dataset_layout import build_layout

    for n, subset in enumerate(build_layout(config).subsets):
        for what, value in (("image_dir", subset.image_dir), ("metadata_file", subset.metadata_path),
                            ("mask_dir", "" if subset.mask == "alpha" else subset.mask)):
            if value:
                rules.check(value, f"subsets[{n}].{what}" if config.subsets or config.dataset_config else what)


def parse_credentials(api_auth: Optional[str]) -> Dict[str, str]:
    """``user:pass,user2:pass2`` (A1111's --api-auth format) -> {user: password}."""
    if not api_auth:
        return {}
    pairs = [item.split(":", 1) for item in api_auth.split(",") if ":" in item]
    return {user.strip(): password.strip() for user, password in pairs}


def _snippet(snapshot: dict, weight: float) -> Optional[str]:
    if not snapshot.get("lora_path"):
        return None
    return f"<lora:{Path(snapshot['lora_path']).stem}:{weight:g}>"


def _write_uploaded_images(images: List[dict], store_root: Path, name: str, limits=None) -> Path:
    """Images sent in the body ({"name", "data": base64, "caption"}) -> a new dataset, under the upload rules
    the tab uses (dataset_store): real images only, size caps, safe names, all or nothing."""
    import csv
    import tempfile

    from .dataset_store import DatasetStore

    if not isinstance(images, list) or not images:
        raise ApiError(422, "'images' must be a non-empty list of {name, data (base64), caption}")
    store = DatasetStore(store_root) if limits is None else DatasetStore(store_root, limits)
    with tempfile.TemporaryDirectory() as tmp:
        files, rows = [], []
        for i, item in enumerate(images):
            item = item if isinstance(item, dict) else {}
            sent = str(item.get("name", ""))
            if not is_safe_name(sent) or Path(sent).suffix.lower() not in IMAGE_SUFFIXES:
                raise ApiError(422, f"'images[{i}].name' {sent!r} must be a plain image file name (.png, .jpg, ...)")
            try:
                data = base64.b64decode(item.get("data", ""), validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(422, f"'images[{i}].data' is not base64") from None
            path = Path(tmp) / f"{i}-{sent}"
            path.write_bytes(data)
            files.append((sent, path))
            rows.append((sent, str(item.get("caption", ""))))
        metadata = Path(tmp) / "metadata.csv"
        with open(metadata, "w", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerows([("filename", "prompt"), *rows])
        folder = store.create(name)
        try:
            report = store.add_files(name, files + [("metadata.csv", metadata)])
        except UserError:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        if report.refused:
            shutil.rmtree(folder, ignore_errors=True)
            bad, why = report.refused[0]
            index = next((i for i, (sent, _) in enumerate(files) if sent == bad), 0)
            raise ApiError(422, f"'images[{index}].data' ({bad}): {why}")
    return folder


def build_router(host: Union[Host, Callable[[], Host]], rules: PathRules,
                 defaults: Union[dict, Callable[[], dict], None] = None,
                 credentials: Optional[Dict[str, str]] = None,
                 caption: Optional[Callable[..., object]] = None):
    """The API's routes as a FastAPI ``APIRouter`` (include it with ``app.include_router``).

    ``host``: one Host, or a function that makes one for each job (the WebUI's objects change between runs);
    ``defaults``: config values a request need not send, or a function giving them at each request (the
    WebUI's loaded checkpoint changes).
    """
    from fastapi import APIRouter, Body, Depends, HTTPException
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.security import HTTPBasic

    dependencies = []
    if credentials:
        basic = HTTPBasic()

        # No annotation: with postponed annotations, FastAPI 0.94 (A1111) cannot resolve a name imported here.
        def authenticate(given=Depends(basic)) -> None:
            password = credentials.get(given.username)
            if password is None or not secrets.compare_digest(password, given.password):
                raise HTTPException(status_code=401, detail="wrong user name or password",
                                    headers={"WWW-Authenticate": "Basic"})

        dependencies.append(Depends(authenticate))
    router = APIRouter(prefix=PREFIX, tags=["LoRA Trainer"], dependencies=dependencies)

    def error(exc: Exception) -> JSONResponse:
        if isinstance(exc, ApiError):
            return JSONResponse({"error": exc.message}, status_code=exc.status)
        if isinstance(exc, JobBusy):
            return JSONResponse({"error": str(exc)}, status_code=409)
        if isinstance(exc, (ConfigError, JobNotExtendable, DatasetError, ModelError)):  # checked before a start
            return JSONResponse({"error": str(exc)}, status_code=422)
        return JSONResponse({"error": str(exc)}, status_code=400)

    def job_or_404(job_id: str):
        job = get_job(job_id)
        if job is None:
            raise ApiError(404, f"no training job with id {job_id!r}")
        return job

    def describe(job) -> dict:
        snap = job.snapshot()
        snap["snippet"] = _snippet(snap, job.config.preferred_weight)
        return snap

    @router.post("/jobs", summary="Start training", status_code=201)
    def create_job(body: dict = Body(..., description="Config keys as in the YAML files; optionally 'images': "
                                                       "[{name, data (base64), caption}] instead of a folder")):
        uploaded: Optional[Path] = None
        try:
            values = {**((defaults() if callable(defaults) else defaults) or {}), **body}
            images = values.pop("images", None)
            name = str(values.get("output_name") or "")
            if name and not is_safe_name(name):
                raise ApiError(422, f"'output_name' {name!r} must be a plain file name, without '/' or '..'")
            if images is not None:
                folder_name = f"{name or 'upload'}-{secrets.token_hex(4)}"
                uploaded = _write_uploaded_images(images, rules.upload_dir, folder_name, rules.upload_limits)
                values["train_data_dir"] = str(uploaded)
            elif not any(values.get(k) for k in ("train_data_dir", "subsets", "dataset_config")):
                raise ApiError(422, "'train_data_dir' is required (a folder on the server), or send 'images' (or "
                                    "'subsets', or a 'dataset_config' file)")
            if values.get("train_data_dir"):
                values["train_data_dir"] = str(rules.check(str(values["train_data_dir"]), "train_data_dir"))
                if not Path(values["train_data_dir"]).is_dir():
                    raise ApiError(422, f"'train_data_dir': {values['train_data_dir']} is not a folder")
            for key in PATH_KEYS:
                if values.get(key):
                    values[key] = str(rules.check(str(values[key]), key))
            values["output_dir"] = str(rules.output_dir)
            values.pop("resume", None)
            config = TrainConfig.from_dict(values, source="request")
            _check_layout_paths(config, rules)
            job = start_job(config, host if hasattr(host, "load_backbone") else host())
            return JSONResponse(describe(job), status_code=201)
        except (ApiError, UserError) as exc:
            if uploaded is not None:  # a refused request leaves nothing behind
                shutil.rmtree(uploaded, ignore_errors=True)
            return error(exc)

    @router.get("/jobs/{job_id}", summary="State, progress, metrics and result of a job")
    def read_job(job_id: str):
        try:
            return JSONResponse(describe(job_or_404(job_id)))
        except ApiError as exc:
            return error(exc)

    @router.post("/jobs/{job_id}/stop", summary="Stop a job (with save: true, keep what was trained)")
    def stop_job(job_id: str, body: dict = Body(default={})):
        try:
            job = job_or_404(job_id)
            job.stop(save=bool(body.get("save", True)))
            return JSONResponse(describe(job))
        except ApiError as exc:
            return error(exc)

    @router.post("/jobs/{job_id}/extend", summary="Continue a finished or stopped job for N more steps")
    def extend_job(job_id: str, body: dict = Body(...)):
        try:
            steps = body.get("steps")
            if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
                raise ApiError(422, "'steps' must be a whole number >= 1")
            return JSONResponse(describe(job_or_404(job_id).extend(steps)), status_code=201)
        except (ApiError, UserError) as exc:
            return error(exc)

    @router.get("/jobs/{job_id}/file", summary="Download the trained .safetensors")
    def download(job_id: str):
        try:
            job = job_or_404(job_id)
            if job.lora_path is None or not Path(job.lora_path).is_file():
                raise ApiError(404, "this job has no finished LoRA file yet")
            return FileResponse(str(job.lora_path), filename=Path(job.lora_path).name,
                                media_type="application/octet-stream")
        except ApiError as exc:
            return error(exc)

    @router.get("/runs", summary="Past runs with their configs and files")
    def list_runs():
        runs = []
        if rules.output_dir.is_dir():
            for folder in sorted(p for p in rules.output_dir.iterdir() if (p / "config.yaml").is_file()):
                run = RunFolder(folder)
                runs.append({"name": run.name, "path": str(folder),
                             "config": (folder / "config.yaml").read_text(encoding="utf-8"),
                             "lora": str(run.lora_path) if run.lora_path.is_file() else None,
                             "files": sorted(p.name for p in folder.iterdir() if p.is_file())})
        return JSONResponse({"runs": runs})

    @router.post("/caption", summary="Auto-caption a dataset folder on the server")
    def caption_folder(body: dict = Body(...)):
        try:
            folder = rules.check(str(body.get("dir", "")), "dir")
            options = {k: body[k] for k in ("model_name", "pretrained", "mode", "fmt", "trigger", "threshold")
                       if k in body}
            run_caption = caption
            if run_caption is None:
                from .caption import caption_dataset as run_caption
            result = run_caption(folder, **options)
            return JSONResponse({"captions": getattr(result, "captions", {}),
                                 "unreadable": [[str(p), r] for p, r in getattr(result, "unreadable", [])],
                                 "summary": result.summary() if hasattr(result, "summary") else ""})
        except (ApiError, UserError) as exc:
            return error(exc)

    return router


def mount_api(app, host: Union[Host, Callable[[], Host]], output_dir: Path, datasets_dir: Path,
              allowed: Iterable[Path] = (), defaults: Union[dict, Callable[[], dict], None] = None,
              credentials: Optional[Dict[str, str]] = None, upload_limits=None,
              caption: Optional[Callable[..., object]] = None) -> None:
    """Add the routes to a FastAPI ``app`` (the WebUI's, or the standalone app's): runs go to ``output_dir``,
    images sent in a body become datasets in ``datasets_dir``; datasets may be read from those two folders and
    ``allowed``."""
    rules = PathRules([Path(output_dir), Path(datasets_dir), *[Path(a) for a in allowed]], Path(output_dir),
                      Path(datasets_dir), upload_limits)
    app.include_router(build_router(host, rules, defaults, credentials, caption))
    logger.info("LoRA Trainer API on %s (datasets from %s)", PREFIX, ", ".join(str(r) for r in rules.roots))
