"""The HTTP API: start, watch and interrupt jobs, list outputs. Mounted on the standalone app and on a
WebUI's FastAPI app alike, under `/training/v1`.

    GET  /training/v1/methods                 the methods and the JSON Schema of their settings
    POST /training/v1/train/{kind}            start training: 202 + job, 409 if busy, 422 + field errors
    GET  /training/v1/jobs                    recent jobs
    GET  /training/v1/jobs/current            the running or last job (404 if none yet)
    GET  /training/v1/jobs/{id}               one job's state and progress
    POST /training/v1/jobs/{id}/cancel        ask it to stop (a training saves first; a merge leaves no file)
    GET  /training/v1/jobs/{id}/preview       its newest preview image (PNG)
    GET  /training/v1/outputs                 result files
    POST /training/v1/merge                   start a checkpoint merge: 202 + job, 409 if busy, 422 + field errors
    POST /training/v1/lora/bake               start baking LoRAs into a checkpoint (likewise)
    POST /training/v1/lora/extract            start extracting a LoRA from a tuned model and its base
    POST /training/v1/lora/resize             start changing a LoRA's rank
    POST /training/v1/aesthetic/create        start making an aesthetic embedding from a folder of images
    POST /training/v1/{kind}/create           a method's Create step (hypernetwork): 201 + the file, 422 + field errors

Merges are jobs like trainings (watched and cancelled with the job routes), and one job runs at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from lib_training.app.aesthetic_service import CreateConfig
from lib_training.app.jobs import Job, JobBusyError, JobNotFoundError
from lib_training.app.merge_service import TOOLS, MergeService, MergeTool
from lib_training.app.merge_service import request_schema as merge_request_schema
from lib_training.app.service import TrainingService
from lib_training.errors import UserError
from lib_training.methods import registered, spec_for
from lib_training.options import SettingsError, json_schema
from lib_training.training.request import GROUPS, group_settings

PREFIX = "/training/v1"


def request_schema(kind: str) -> dict[str, Any]:
    spec = spec_for(kind)
    properties: dict[str, Any] = {group: json_schema(*group_settings(spec, group)) for group in GROUPS}
    properties["resume"] = {"type": "boolean", "default": False, "description": "Continue the saved run."}
    return {"type": "object", "properties": properties, "required": ["method", "data"], "additionalProperties": False}


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"detail": message, **extra}, status_code=status)


def build_router(service: TrainingService, merges: MergeService | None = None) -> APIRouter:
    """The routes, over `service` and `merges` (by default a `MergeService` sharing the service's jobs)."""
    router = APIRouter(prefix=PREFIX, tags=["sd-webui-training"])
    merges = merges or MergeService(service.workspace, service.jobs)

    @router.get("/methods")
    def methods() -> dict[str, Any]:
        return {kind: {"title": spec.title, "schema": request_schema(kind)} for kind, spec in registered().items()}

    for kind, spec in registered().items():
        _add_train_route(router, service, kind)
        if spec.create is not None:
            _add_create_route(router, service, kind)
    for spec in TOOLS.values():
        _add_merge_route(router, merges, spec)
    _add_aesthetic_route(router, service)

    @router.get("/jobs")
    def jobs() -> list[dict[str, Any]]:
        return [job.to_dict() for job in service.jobs.jobs()]

    @router.get("/jobs/current", responses={404: {"description": "no job has run yet"}})
    def current_job() -> Any:
        job = service.jobs.current()
        return job.to_dict() if job else _error(404, "no job has run yet")

    @router.get("/jobs/{job_id}", responses={404: {"description": "unknown job"}})
    def job(job_id: str) -> Any:
        try:
            return service.jobs.get(job_id).to_dict()
        except JobNotFoundError as error:
            return _error(404, str(error))

    @router.post("/jobs/{job_id}/cancel", responses={404: {"description": "unknown job"}, 409: {}})
    def cancel(job_id: str) -> Any:
        try:
            job = service.jobs.get(job_id)
        except JobNotFoundError as error:
            return _error(404, str(error))
        if not job.running:
            return _error(409, f"job {job_id} is not running (it {job.state})")
        return service.jobs.cancel(job_id).to_dict()

    @router.get("/jobs/{job_id}/preview", response_class=FileResponse, responses={404: {}})
    def preview(job_id: str) -> Any:
        try:
            job = service.jobs.get(job_id)
        except JobNotFoundError as error:
            return _error(404, str(error))
        path = job.progress.preview if job.progress else None
        if path is None or not path.exists():
            return _error(404, "no preview image yet")
        return FileResponse(path, media_type="image/png")

    @router.get("/outputs")
    def outputs() -> list[dict[str, Any]]:
        return [output.to_dict() for output in service.outputs()]

    return router


async def _start_job(request: Request, start: Callable[[Any], Job]) -> JSONResponse:
    """202 and the job `start(body)` started; 409 if another job runs; 422 with field errors."""
    try:
        body = await request.json()
    except ValueError:
        return _error(422, "the request body is not JSON", errors={"": "not JSON"})
    try:
        job = start(body)
    except SettingsError as error:
        return _error(422, "invalid settings", errors=error.errors)
    except JobBusyError as error:
        return _error(409, str(error))
    except UserError as error:
        return _error(422, str(error), errors={"": str(error)})
    return JSONResponse(job.to_dict(), status_code=202)


def _add_train_route(router: APIRouter, service: TrainingService, kind: str) -> None:
    spec = spec_for(kind)

    async def start(request: Request) -> Any:
        return await _start_job(request, lambda body: service.start_training(kind, body))

    router.add_api_route(
        f"/train/{kind}",
        start,
        methods=["POST"],
        summary=f"Start training: {spec.title}",
        status_code=202,
        responses={409: {"description": "another job is running"}, 422: {"description": "invalid settings"}},
        openapi_extra={
            "requestBody": {"required": True, "content": {"application/json": {"schema": request_schema(kind)}}}
        },
    )


def create_schema(kind: str) -> dict[str, Any]:
    """The JSON Schema of a method's Create step: the fields it takes."""
    step = spec_for(kind).create
    assert step is not None
    schema = json_schema(step.settings)
    schema["properties"] = {name: schema["properties"][name] for name in step.fields}
    schema["required"] = [name for name in schema.get("required", []) if name in step.fields]
    return schema


def _add_create_route(router: APIRouter, service: TrainingService, kind: str) -> None:
    spec = spec_for(kind)

    async def create(request: Request) -> Any:
        try:
            body = await request.json()
        except ValueError:
            return _error(422, "the request body is not JSON", errors={"": "not JSON"})
        try:
            path = await run_in_threadpool(service.create, kind, body)  # seconds for SDXL widths: off the loop
        except SettingsError as error:
            return _error(422, "invalid settings", errors=error.errors)
        except UserError as error:
            return _error(422, str(error), errors={"": str(error)})
        return JSONResponse({"kind": kind, "name": path.stem, "result": str(path)}, status_code=201)

    router.add_api_route(
        f"/{kind}/create",
        create,
        methods=["POST"],
        summary=f"Create: {spec.title}",
        description=(spec.create.summary if spec.create else "") + " Written to the folder of the kind's results.",
        status_code=201,
        responses={422: {"description": "invalid settings"}},
        openapi_extra={
            "requestBody": {"required": True, "content": {"application/json": {"schema": create_schema(kind)}}}
        },
    )


def _add_aesthetic_route(router: APIRouter, service: TrainingService) -> None:
    async def start(request: Request) -> Any:
        return await _start_job(request, service.aesthetic.start_create)

    router.add_api_route(
        "/aesthetic/create",
        start,
        methods=["POST"],
        summary="Start: aesthetic embedding",
        description=(CreateConfig.__doc__ or "").strip() + " Written to `out`, else the aesthetic embeddings folder.",
        status_code=202,
        responses={409: {"description": "another job is running"}, 422: {"description": "invalid settings"}},
        openapi_extra={
            "requestBody": {"required": True, "content": {"application/json": {"schema": json_schema(CreateConfig)}}}
        },
    )


_MERGE_PATHS = (
    " Model inputs are paths, or names relative to the model folders; a relative output name is written to the "
    "merge output folder (OUT/merge/ in the standalone app)."
)


def _add_merge_route(router: APIRouter, merges: MergeService, spec: MergeTool) -> None:
    async def start(request: Request) -> Any:
        return await _start_job(request, lambda body: merges.start(spec.kind, body))

    router.add_api_route(
        f"/{spec.kind}",
        start,
        methods=["POST"],
        summary=f"Start: {spec.title}",
        description=(spec.config.__doc__ or "").strip() + _MERGE_PATHS,
        status_code=202,
        responses={409: {"description": "another job is running"}, 422: {"description": "invalid settings"}},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": merge_request_schema(spec.kind)}},
            }
        },
    )
