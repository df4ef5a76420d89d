"""HTTP API of async batch jobs: POST /classify/jobs, GET and DELETE /classify/jobs/{id}.

With API keys on, a job belongs to the key that created it: any other key gets 404, as for a job
that does not exist. Without keys, `owner_header` (set by the mesh from the caller's verified
token, e.g. Istio's outputClaimToHeaders with the JWT subject) names the owner instead. A job is one call for the guard (auth, rate limit, in-flight, deadline, body
size) and is charged one rate-limit token per file: the guard takes the first, this route the rest.
Reading or cancelling one passes the guard too, under its own read budget.

What one replica holds of jobs is bounded: a job's parts (files + 1, so that one file too many is
told apart from a flood of parts), each file (the single-image limit), and the bytes of job uploads
in progress here plus, with the in-process store, of the inputs it keeps until they are classified
(`QueuedBytes`: per replica, and per API key, or per client address without keys).
"""

import hashlib
import re
from contextlib import asynccontextmanager

import orjson
from fastapi import APIRouter, Query, Request, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from predictor.core.errors import (
    Conflict,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    Unavailable,
    UnprocessableRequest,
)
from predictor.core.security import RateLimiter
from predictor.jobs.core import JOBS, TERMINAL, Job, JobStore, JobWorker
from predictor.serving.http_errors import BodyRefused

_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
# A page is serialised in one piece on the event loop: 1,000 results are ~250 KB.
MAX_PAGE = 1000

_MULTIPART_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["files"],
    "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"},
                             "description": "JPEG or PNG images"}}}}}}}


class QueuedBytes:
    """Job bytes this replica holds, against a cap per replica and per account (API key, or client
    address without keys): uploads being received (their declared size, or the job body limit when
    undeclared) plus what the store keeps here (`held_bytes`: the in-process store's inputs)."""

    def __init__(self, store: JobStore, per_replica: int, per_account: int):
        self.store = store
        self.per_replica = per_replica
        self.per_account = per_account
        self._uploads: dict[str, int] = {}

    def reserve(self, account: str, size: int) -> None:
        limit = min(self.per_replica, self.per_account)
        if size > limit:
            raise PayloadTooLarge("job_too_large", f"A job of {size} bytes exceeds the {limit} bytes of jobs one caller "
                           "may have queued; split it.")
        held_total, held_account = self.store.held_bytes(account)
        total = sum(self._uploads.values()) + held_total
        mine = self._uploads.get(account, 0) + held_account
        if mine + size > self.per_account:
            raise Unavailable("job_queue_full", f"Your queued jobs hold {mine} bytes; {size} more would exceed the "
                           f"limit of {self.per_account} per caller. Retry once they have run.", {"Retry-After": "10"})
        if total + size > self.per_replica:
            raise Unavailable("job_queue_full", "This replica holds as many job bytes as it may; retry shortly.",
                           {"Retry-After": "10"})
        self._uploads[account] = self._uploads.get(account, 0) + size

    def release(self, account: str, size: int) -> None:
        left = self._uploads.get(account, 0) - size
        if left > 0:
            self._uploads[account] = left
        else:
            self._uploads.pop(account, None)


def build_jobs_router(store: JobStore, worker: JobWorker, limiter: RateLimiter | None, max_files: int,
                      max_bytes: int, chunk_size: int, max_file_bytes: int, queued: QueuedBytes,
                      owner_header: str | None = None) -> APIRouter:
    """The jobs routes over `store`; `worker` runs (and the store stays open) while the app is up."""

    @asynccontextmanager
    async def lifespan(_app):
        store.start()
        worker.start()
        yield
        await worker.stop()
        await store.close()

    router = APIRouter(tags=["jobs"], lifespan=lifespan)

    def owner(request: Request) -> str | None:
        key = getattr(request.state, "api_key_id", None)  # the guard authenticated the key
        if key is not None or not owner_header:
            return key
        subject = request.headers.get(owner_header)
        if not subject:
            raise Unauthorized("unauthorized", "Jobs need an authenticated caller: send a valid token.",
                           {"WWW-Authenticate": "Bearer"})
        return "sub:" + hashlib.sha256(subject.encode()).hexdigest()[:16]

    async def owned(request: Request, job_id: str) -> Job:
        caller = owner(request)
        job = await store.get(job_id) if _JOB_ID.match(job_id) else None
        if job is None or job.owner != caller:  # another key's job is as invisible as a missing one
            raise NotFound("job_not_found", f"No job {shown(job_id)} (it may have expired).")
        return job

    async def read_files(request: Request) -> list[bytes]:
        try:
            # Parts beyond max_files + 1 stop the parser at once: each costs ~1 KB however small.
            form = await request.form(max_files=max_files + 1, max_fields=8)
        except BodyRefused:  # the guard's size limit, met while the parser read the body
            raise
        except HTTPException as exc:  # the parser's refusals: too many parts, malformed multipart
            if str(exc.detail).startswith("Too many files"):
                raise PayloadTooLarge("too_many_files", f"More than {max_files} files per job.") from None
            if str(exc.detail).startswith("Too many fields"):
                raise PayloadTooLarge("too_many_fields", "Too many form fields: send the images as `files` only.") from None
            raise InvalidRequest("invalid_request", f"The multipart body cannot be parsed: {exc.detail}") from None
        except ClientDisconnect:
            raise InvalidRequest("invalid_request", "The request body ended before it was complete.") from None
        try:
            files = form.getlist("files")
            if not files or not all(isinstance(f, UploadFile) for f in files):
                raise UnprocessableRequest("invalid_request", "body.files: multipart file fields `files` are required.")
            if len(files) > max_files:
                raise PayloadTooLarge("too_many_files", f"{len(files)} files exceed the limit of {max_files} per job.")
            for number, upload in enumerate(files):
                if upload.size is not None and upload.size > max_file_bytes:
                    raise PayloadTooLarge("file_too_large", f"File {number} ({upload.size} bytes) exceeds the limit of "
                                   f"{max_file_bytes} bytes per image.")
            return [await f.read() for f in files]
        finally:
            await form.close()

    @router.post("/classify/jobs", status_code=202, summary="Submit images for asynchronous classification",
                 openapi_extra=_MULTIPART_BODY)
    async def submit(request: Request, response: Response,
                     top_k: int | None = Query(None, ge=1, le=10, description="also return the k best classes")):
        """Multipart fields `files` (up to --max_job_files) -> 202 {"job_id", "status", "status_url"}.
        Each file is validated when its chunk is worked on; a bad one gets an error object in its slot."""
        caller = owner(request)
        account = caller or request.state.caller
        declared = request.headers.get("content-length", "")
        size = min(int(declared), max_bytes) if declared.isdigit() else max_bytes
        queued.reserve(account, size)
        try:
            data = await read_files(request)
            job = await store.create(caller, data, top_k, chunk_size, account=account)
        finally:
            queued.release(account, size)
        JOBS.labels("queued").inc()
        if limiter is not None and len(data) > 1:
            limiter.charge(request.state.caller, len(data) - 1)
        status_url = f"/classify/jobs/{job.job_id}"
        response.headers["Location"] = status_url
        return {"job_id": job.job_id, "status": job.status, "status_url": status_url}

    @router.get("/classify/jobs/{job_id}", summary="A job's status, and its results once it has succeeded")
    async def status(request: Request, job_id: str,
                     offset: int = Query(0, ge=0, description="first result to return"),
                     limit: int = Query(MAX_PAGE, ge=1, le=MAX_PAGE, description="results per page")):
        """{"job_id", "status", "progress": {"done", "total"}, "model_version", "created_at", "finished_at", ...};
        once succeeded, `results` [offset, offset + limit) in input order and `next_offset` (null on the last page)."""
        job = await owned(request, job_id)
        body = describe(job)
        if job.status == "succeeded":
            # Stored as JSON, sent as is: decoding and re-encoding a page cost more than the read.
            body["results"] = orjson.Fragment(b"[" + b",".join(await store.raw_results(job_id, offset, limit)) + b"]")
            body["next_offset"] = offset + limit if offset + limit < job.total else None
        return Response(orjson.dumps(body), media_type="application/json")

    @router.delete("/classify/jobs/{job_id}", summary="Cancel a job that has not finished")
    async def cancel(request: Request, job_id: str):
        """Cancels a queued or running job (chunks already computed stay computed); 409 once it has finished."""
        job = await owned(request, job_id)
        if job.status in TERMINAL or not await store.cancel(job_id):
            raise Conflict("job_finished", f"Job {job_id} has already finished ({job.status}).")
        JOBS.labels("cancelled").inc()
        return describe(await store.get(job_id))

    return router


def shown(job_id: str) -> str:
    """A job id as an error message may echo it: a caller's input, so at most a valid id's length of it."""
    return repr(job_id) if len(job_id) <= 32 else f"{job_id[:32]!r}... ({len(job_id)} characters)"


def describe(job: Job) -> dict:
    body = {"job_id": job.job_id, "status": job.status, "progress": {"done": job.done, "total": job.total},
            "model_version": job.model_version, "created_at": job.created_at, "finished_at": job.finished_at}
    if job.error:
        body["error"] = {"code": "job_failed", "message": job.error}
    return body

