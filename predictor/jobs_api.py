"""HTTP API of async batch jobs: POST /classify/jobs, GET and DELETE /classify/jobs/{id}.

With API keys on, a job belongs to the key that created it: any other key gets 404, as for a job
that does not exist. A job is one call for the guard (auth, rate limit, in-flight, deadline, body
size) and is charged one rate-limit token per file: the guard takes the first, this route the rest.
"""

import re
from contextlib import asynccontextmanager

from fastapi import APIRouter, File, Query, Request, Response, UploadFile

from .errors import ApiError
from .jobs import JOBS, TERMINAL, Job, JobStore, JobWorker, StoreUnavailable
from .security import ApiKeys, RateLimiter, key_id, presented_key

_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
MAX_PAGE = 10_000


def build_jobs_router(store: JobStore, worker: JobWorker, api_keys: ApiKeys, limiter: RateLimiter | None,
                      max_files: int, max_bytes: int, chunk_size: int) -> APIRouter:
    """The jobs routes over `store`; `worker` runs (and the store stays open) while the app is up."""

    @asynccontextmanager
    async def lifespan(_app):
        worker.start()
        yield
        await worker.stop()
        await store.close()

    router = APIRouter(tags=["jobs"], lifespan=lifespan)

    def owner(request: Request) -> str | None:
        # GET and DELETE are not prediction calls, so the guard does not authenticate them: done here.
        if not api_keys.enabled:
            return None
        key = presented_key(dict(request.scope["headers"]))
        if not api_keys.accepts(key):
            raise ApiError(401, "unauthorized", "A valid API key is required: send 'Authorization: Bearer <key>' "
                           "or 'X-API-Key: <key>'.", {"WWW-Authenticate": "Bearer"})
        return key_id(key)

    async def owned(request: Request, job_id: str) -> Job:
        caller = owner(request)
        job = await store.get(job_id) if _JOB_ID.match(job_id) else None
        if job is None or job.owner != caller:  # another key's job is as invisible as a missing one
            raise ApiError(404, "job_not_found", f"No job {job_id!r} (it may have expired).")
        return job

    # The multipart parser's own file-count limit would answer 400; the count is checked here (413),
    # and the body size, which the guard bounds, bounds the parser's work.
    @router.post("/classify/jobs", status_code=202, summary="Submit images for asynchronous classification",
                 form_limits={"max_files": max(max_files, max_bytes // 64)})
    async def submit(request: Request, response: Response,
                     files: list[UploadFile] = File(..., description="JPEG or PNG images"),
                     top_k: int | None = Query(None, ge=1, le=10, description="also return the k best classes")):
        """Multipart fields `files` (up to --max_job_files) -> 202 {"job_id", "status", "status_url"}.
        Each file is validated when its chunk is worked on; a bad one gets an error object in its slot."""
        if len(files) > max_files:
            raise ApiError(413, "too_many_files", f"{len(files)} files exceed the limit of {max_files} per job.")
        caller = owner(request)
        data = [await f.read() for f in files]
        try:
            job = await store.create(caller, data, top_k, chunk_size)
        except StoreUnavailable as exc:
            raise unavailable(exc) from None
        JOBS.labels("queued").inc()
        if limiter is not None and len(files) > 1:
            limiter.charge(request.state.caller, len(files) - 1)
        status_url = f"/classify/jobs/{job.job_id}"
        response.headers["Location"] = status_url
        return {"job_id": job.job_id, "status": job.status, "status_url": status_url}

    @router.get("/classify/jobs/{job_id}", summary="A job's status, and its results once it has succeeded")
    async def status(request: Request, job_id: str,
                     offset: int = Query(0, ge=0, description="first result to return"),
                     limit: int = Query(1000, ge=1, le=MAX_PAGE, description="results per page")):
        """{"job_id", "status", "progress": {"done", "total"}, "created_at", "finished_at", ...}; once
        succeeded, `results` [offset, offset + limit) in input order and `next_offset` (null on the last page)."""
        try:
            job = await owned(request, job_id)
            body = describe(job)
            if job.status == "succeeded":
                body["results"] = await store.results(job_id, offset, limit)
                body["next_offset"] = offset + limit if offset + limit < job.total else None
        except StoreUnavailable as exc:
            raise unavailable(exc) from None
        return body

    @router.delete("/classify/jobs/{job_id}", summary="Cancel a job that has not finished")
    async def cancel(request: Request, job_id: str):
        """Cancels a queued or running job (chunks already computed stay computed); 409 once it has finished."""
        try:
            job = await owned(request, job_id)
            if job.status in TERMINAL or not await store.cancel(job_id):
                raise ApiError(409, "job_finished", f"Job {job_id} has already finished ({job.status}).")
            JOBS.labels("cancelled").inc()
            return describe(await store.get(job_id))
        except StoreUnavailable as exc:
            raise unavailable(exc) from None

    return router


def describe(job: Job) -> dict:
    body = {"job_id": job.job_id, "status": job.status, "progress": {"done": job.done, "total": job.total},
            "created_at": job.created_at, "finished_at": job.finished_at}
    if job.error:
        body["error"] = {"code": "job_failed", "message": job.error}
    return body


def unavailable(exc: StoreUnavailable) -> ApiError:
    return ApiError(503, "job_store_unavailable", f"The job store (Redis) cannot be reached ({exc}); retry shortly.",
                    {"Retry-After": "5"})
