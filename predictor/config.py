"""Command-line flags (KServe's own plus ours); each of ours also reads an environment variable."""

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

from .security import ApiKeys
from .weights import PACKAGED_DIR

DEFAULT_MODEL_NAME = "cifar10-resnet18"
STORAGE_MOUNT = Path("/mnt/models")  # where KServe's storage initializer puts STORAGE_URI's files


@dataclass
class Settings:
    """Serving limits and knobs; every one is a flag and an env var (`build_parser`)."""

    model_dir: Path | None = None
    random_weights: bool = False
    device: str = "auto"
    max_batch_size: int = 32
    max_batch_delay_ms: float = 2.0
    max_batch_files: int = 64
    max_body_bytes: int = 10 * 1024 * 1024
    max_image_side: int = 4096
    decode_threads: int = 2
    max_queue_images: int = 256
    max_in_flight: int = 256
    request_timeout_s: float = 30.0
    drain_timeout_s: int = 20
    api_keys: ApiKeys = field(default_factory=lambda: ApiKeys([]))
    rate_limit_per_minute: int = 100
    trusted_proxy_hops: int = 0  # proxies in front appending to X-Forwarded-For (predictor.security.client_address)
    engine: str = "auto"
    precision: str = "auto"
    compile: bool = True
    intra_op_threads: int = 0  # 0: the usable cores shared out among the worker processes
    workers: int = 1
    ui: bool = True  # the demo page at GET / (predictor.demo)
    max_explain_in_flight: int = 2  # :explain calls computing at once (predictor.explain)
    redis_url: str | None = None  # jobs and result cache shared by replicas; None: in this process only
    max_job_files: int = 10_000
    max_job_bytes: int = 100 * 1024 * 1024
    job_ttl_s: int = 86_400
    job_chunk_size: int = 256
    job_visibility_timeout_s: float = 60.0
    job_owner_header: str | None = None  # without API keys: the header naming a job's owner (set by the mesh)
    job_reads_per_minute: int = 600  # GET/DELETE /classify/jobs/{id} per caller, apart from the prediction budget
    max_job_queued_bytes: int = 512 * 1024 * 1024  # job bytes one replica holds (uploads, in-process inputs)
    max_job_queued_bytes_per_key: int = 256 * 1024 * 1024
    cache_ttl_s: int = 3600  # 0: no result cache
    cache_shared_across_keys: bool = False  # with API keys on, entries are per key unless this is set


def _env(name: str, default, cast=str):
    value = os.environ.get(name)
    return default if value in (None, "") else cast(value)


def default_model_dir() -> Path:
    """/mnt/models when KServe downloaded weights (STORAGE_URI set), else the weights in the package."""
    return STORAGE_MOUNT if os.environ.get("STORAGE_URI") else PACKAGED_DIR


def build_parser(kserve_parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m predictor", parents=[kserve_parser],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Serve the CIFAR-10 ResNet18 with KServe's ModelServer.",
    )
    # /docs is on unless turned off (predictor.__main__ tells KServe so before it builds its app): say so in --help.
    parser.set_defaults(model_name=_env("MODEL_NAME", DEFAULT_MODEL_NAME), enable_docs_url=True)
    add = parser.add_argument
    add("--model_dir", type=Path, default=_env("MODEL_DIR", None, Path),
        help="directory with the weights and model_card.json [env MODEL_DIR; default /mnt/models when STORAGE_URI is set, "
             "else the weights shipped in the package]")
    add("--random_weights", action="store_true", help="serve an untrained network (tests only; never in production)")
    add("--device", default=_env("DEVICE", "auto"), choices=["auto", "cpu", "cuda"], help="[env DEVICE]")
    add("--max_batch_size", type=int, default=_env("MAX_BATCH_SIZE", 32, int), help="images per forward pass [env MAX_BATCH_SIZE]")
    add("--max_batch_delay_ms", type=float, default=_env("MAX_BATCH_DELAY_MS", 2.0, float),
        help="longest wait for a batch to fill once a request is in [env MAX_BATCH_DELAY_MS]")
    add("--max_batch_files", type=int, default=_env("MAX_BATCH_FILES", 64, int),
        help="images per request on /classify/batch, v1 and v2 [env MAX_BATCH_FILES]")
    add("--max_body_bytes", type=int, default=_env("MAX_BODY_BYTES", 10 * 1024 * 1024, int),
        help="largest request body; larger ones get 413 before they are read [env MAX_BODY_BYTES]")
    add("--max_image_side", type=int, default=_env("MAX_IMAGE_SIDE", 4096, int),
        help="largest width or height accepted, checked before decoding [env MAX_IMAGE_SIDE]")
    add("--decode_threads", type=int, default=_env("DECODE_THREADS", 2, int), help="image decoding threads [env DECODE_THREADS]")
    add("--intra_op_threads", type=int, default=_env("INTRA_OP_THREADS", 0, int),
        help="threads of one forward pass (ONNX Runtime or torch); 0: the usable cores (affinity, cgroup CPU "
             "limit) divided among the --workers [env INTRA_OP_THREADS]")
    add("--engine", default=_env("ENGINE", "auto"), choices=["auto", "onnx", "torch"],
        help="onnx: ONNX Runtime with the shipped int8 graph (CPU; no compiler, no compile time); torch: CUDA and every "
             "CPU precision; auto: onnx on the CPU for precision auto/int8, else torch [env ENGINE]")
    add("--precision", default=_env("PRECISION", "auto"), choices=["auto", "fp32", "bf16", "int8", "fp16"],
        help="numeric precision of the forward pass; auto picks the fastest that keeps accuracy on this device [env PRECISION]")
    add("--compile", type=_boolean, default=_env("COMPILE", True, _boolean),
        help="torch engine: torch.compile the forward pass at load (needs a C++ compiler; slower start, faster serving; "
             "torch int8 always compiles) [env COMPILE]")
    add("--max_queue_images", type=int, default=_env("MAX_QUEUE_IMAGES", 256, int),
        help="images waiting for a forward pass before new requests get 503 + Retry-After [env MAX_QUEUE_IMAGES]")
    add("--max_in_flight", type=int, default=_env("MAX_IN_FLIGHT", 256, int),
        help="prediction calls handled at once (uploading, decoding, queued, computing); beyond it a new call gets "
             "503 + Retry-After before its body is read [env MAX_IN_FLIGHT]")
    add("--request_timeout_s", type=float, default=_env("REQUEST_TIMEOUT_S", 30.0, float),
        help="deadline of a prediction call, body upload included; past it the caller gets 504 [env REQUEST_TIMEOUT_S]")
    add("--drain_timeout_s", type=int, default=_env("DRAIN_TIMEOUT_S", 20, int),
        help="after SIGTERM, how long admitted requests get to finish before the process exits [env DRAIN_TIMEOUT_S]")
    add("--api_keys_file", type=Path, default=_env("API_KEYS_FILE", None, Path),
        help="file with one API key per line (a mounted Secret); with keys configured (here or in env API_KEYS, "
             "comma-separated) prediction calls need 'Authorization: Bearer <key>' or 'X-API-Key' [env API_KEYS_FILE]")
    add("--rate_limit_per_minute", type=int, default=_env("RATE_LIMIT_PER_MINUTE", 100, int),
        help="prediction calls per minute per API key (per client address without keys), per replica; 0 turns it off "
             "[env RATE_LIMIT_PER_MINUTE]")
    add("--trusted_proxy_hops", type=int, default=_env("TRUSTED_PROXY_HOPS", 0, int),
        help="proxies in front that each append to X-Forwarded-For; without API keys the rate limit counts the "
             "address the outermost of them saw, the N-th entry from the right (fewer entries: the left-most); 0: the "
             "peer address, the header ignored (Envoy's xff_num_trusted_hops) [env TRUSTED_PROXY_HOPS]")
    add("--ui", type=_boolean, default=_env("UI", True, _boolean),
        help="serve the demo page at GET / (false: 404) [env UI]")
    add("--max_explain_in_flight", type=int, default=_env("MAX_EXPLAIN_IN_FLIGHT", 2, int),
        help=":explain calls computing Grad-CAM at once (fp32, outside the prediction batcher); beyond it a new "
             "one gets 503 + Retry-After [env MAX_EXPLAIN_IN_FLIGHT]")
    add("--redis_url", default=_env("REDIS_URL", None),
        help="redis://[:password@]host:port/db holding async jobs and the result cache, shared by every replica; "
             "without it both live in this process only (jobs lost on restart, one replica) [env REDIS_URL]")
    add("--max_job_files", type=int, default=_env("MAX_JOB_FILES", 10_000, int),
        help="images per async job (POST /classify/jobs) [env MAX_JOB_FILES]")
    add("--max_job_bytes", type=int, default=_env("MAX_JOB_BYTES", 100 * 1024 * 1024, int),
        help="largest POST /classify/jobs body (instead of --max_body_bytes) [env MAX_JOB_BYTES]")
    add("--job_ttl_s", type=int, default=_env("JOB_TTL_S", 86_400, int),
        help="a job and its results are deleted this long after its last change [env JOB_TTL_S]")
    add("--job_chunk_size", type=int, default=_env("JOB_CHUNK_SIZE", 256, int),
        help="images per unit of job work; a replica that dies loses at most its chunks in progress, which "
             "another replica redoes [env JOB_CHUNK_SIZE]")
    add("--job_visibility_timeout_s", type=float, default=_env("JOB_VISIBILITY_TIMEOUT_S", 60.0, float),
        help="a chunk whose replica has not signalled for this long is taken over by another [env JOB_VISIBILITY_TIMEOUT_S]")
    add("--job_owner_header", default=_env("JOB_OWNER_HEADER", None),
        help="without API keys, the request header whose value owns a job (only its owner reads or cancels it; "
             "none: 401). Only for a header the mesh sets from a verified token, such as Istio's outputClaimToHeaders "
             "with the JWT subject; a client could write it otherwise [env JOB_OWNER_HEADER]")
    add("--job_reads_per_minute", type=int, default=_env("JOB_READS_PER_MINUTE", 600, int),
        help="job status reads and cancellations per minute per API key (per client address without keys), per "
             "replica, counted apart from --rate_limit_per_minute; 0 turns it off [env JOB_READS_PER_MINUTE]")
    add("--max_job_queued_bytes", type=int, default=_env("MAX_JOB_QUEUED_BYTES", 512 * 1024 * 1024, int),
        help="job bytes one replica may hold: uploads being received (spooled to /tmp) plus, without Redis, the "
             "inputs of queued jobs; beyond it a job gets 503 + Retry-After [env MAX_JOB_QUEUED_BYTES]")
    add("--max_job_queued_bytes_per_key", type=int, default=_env("MAX_JOB_QUEUED_BYTES_PER_KEY", 256 * 1024 * 1024, int),
        help="the same, per API key (per client address without keys); a job larger than it gets 413 "
             "[env MAX_JOB_QUEUED_BYTES_PER_KEY]")
    add("--cache_ttl_s", type=int, default=_env("CACHE_TTL_S", 3600, int),
        help="how long a classification result stays cached (same image bytes, model version, precision, top_k); "
             "0 turns the cache off [env CACHE_TTL_S]")
    add("--cache_shared_across_keys", type=_boolean, default=_env("CACHE_SHARED_ACROSS_KEYS", False, _boolean),
        help="with API keys on, let every key read the cache entries of every other (a hit, or its speed, tells a "
             "key that another sent those exact bytes); false: entries are per key [env CACHE_SHARED_ACROSS_KEYS]")
    return parser


def _boolean(value: str) -> bool:
    if str(value).lower() in ("1", "true", "yes", "on"):
        return True
    if str(value).lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def load_api_keys(args: argparse.Namespace) -> ApiKeys:
    try:
        keys = ApiKeys.load(os.environ.get("API_KEYS", ""), args.api_keys_file)
    except OSError as exc:
        raise SystemExit(f"--api_keys_file: cannot read {args.api_keys_file} ({exc.strerror})") from None
    if args.api_keys_file is not None and not keys.enabled:
        raise SystemExit(f"--api_keys_file: {args.api_keys_file} holds no keys; refusing to serve without the auth it asks for")
    return keys


def settings_from(args: argparse.Namespace) -> Settings:
    for name, minimum in (("max_batch_size", 1), ("max_batch_files", 1), ("max_body_bytes", 1), ("max_image_side", 1),
                          ("decode_threads", 1), ("max_queue_images", 1), ("max_in_flight", 1), ("request_timeout_s", 0.001),
                          ("drain_timeout_s", 0), ("rate_limit_per_minute", 0), ("intra_op_threads", 0),
                          ("trusted_proxy_hops", 0), ("max_explain_in_flight", 1), ("max_job_files", 1),
                          ("max_job_bytes", 1), ("job_ttl_s", 1), ("job_chunk_size", 1),
                          ("job_visibility_timeout_s", 0.1), ("cache_ttl_s", 0), ("job_reads_per_minute", 0),
                          ("max_job_queued_bytes", 1), ("max_job_queued_bytes_per_key", 1)):
        if getattr(args, name) < minimum:
            raise SystemExit(f"--{name} must be >= {minimum}")
    if os.environ.get("TRUST_FORWARDED_FOR"):
        raise SystemExit("TRUST_FORWARDED_FOR is replaced by TRUSTED_PROXY_HOPS (--trusted_proxy_hops): the number of "
                         "proxies in front that append to X-Forwarded-For, 0 for none")
    return Settings(
        model_dir=args.model_dir or default_model_dir(), random_weights=args.random_weights, device=args.device,
        max_batch_size=args.max_batch_size, max_batch_delay_ms=max(0.0, args.max_batch_delay_ms),
        max_batch_files=args.max_batch_files, max_body_bytes=args.max_body_bytes,
        max_image_side=args.max_image_side, decode_threads=args.decode_threads,
        max_queue_images=args.max_queue_images, max_in_flight=args.max_in_flight, request_timeout_s=args.request_timeout_s,
        drain_timeout_s=args.drain_timeout_s, api_keys=load_api_keys(args),
        rate_limit_per_minute=args.rate_limit_per_minute, trusted_proxy_hops=args.trusted_proxy_hops,
        engine=args.engine, precision=args.precision, compile=args.compile, intra_op_threads=args.intra_op_threads,
        workers=args.workers, ui=args.ui, max_explain_in_flight=args.max_explain_in_flight,
        redis_url=args.redis_url, max_job_files=args.max_job_files, max_job_bytes=args.max_job_bytes,
        job_ttl_s=args.job_ttl_s, job_chunk_size=args.job_chunk_size,
        job_visibility_timeout_s=args.job_visibility_timeout_s, cache_ttl_s=args.cache_ttl_s,
        cache_shared_across_keys=args.cache_shared_across_keys, job_reads_per_minute=args.job_reads_per_minute,
        job_owner_header=args.job_owner_header or None,
        max_job_queued_bytes=args.max_job_queued_bytes, max_job_queued_bytes_per_key=args.max_job_queued_bytes_per_key,
    )
