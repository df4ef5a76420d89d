"""The predictor's settings, each declared once: its type, default, flag, environment variable, help
and bounds. The command line (KServe's own flags plus these), the environment reading and `Settings`
all come from the declarations below; tests/test_config.py holds the chart's env block and the
README's flag table to them."""

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from predictor.core.security import ApiKeys
from predictor.weights import PACKAGED_DIR

DEFAULT_MODEL_NAME = "cifar10-resnet18"
STORAGE_MOUNT = Path("/mnt/models")  # where KServe's storage initializer puts STORAGE_URI's files


def _boolean(value: str) -> bool:
    if str(value).lower() in ("1", "true", "yes", "on"):
        return True
    if str(value).lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def setting(default, help: str, *, env: str | None = None, parse=None, choices: tuple[str, ...] | None = None,
            minimum: float | None = None):
    """A setting: flag `--<field name>`, read from env `env` when given, parsed by `parse` (the default's
    type unless given), refused below `minimum`."""
    return field(default=default, metadata={"help": help, "env": env, "parse": parse, "choices": choices,
                                            "minimum": minimum})


@dataclass
class Settings:
    """Serving limits and knobs. Fields declared with `setting` are flags and env vars; the others are
    derived from them (`settings_from`) or are KServe's own flags."""

    model_dir: Path | None = setting(
        None, "directory with the weights and model_card.json [default /mnt/models when STORAGE_URI is set, else the "
        "weights shipped in the package]", env="MODEL_DIR", parse=Path)
    random_weights: bool = setting(False, "serve an untrained network (tests only; never in production)")
    device: str = setting("auto", "auto: CUDA when usable, else the CPU", env="DEVICE", choices=("auto", "cpu", "cuda"))
    max_batch_size: int = setting(32, "images per forward pass", env="MAX_BATCH_SIZE", minimum=1)
    engine_max_batch_size: int = setting(
        0, "with --workers N: images per forward pass of the engine process, which joins the front ends' batches "
        "(0: --max_batch_size x N)", env="ENGINE_MAX_BATCH_SIZE", minimum=0)
    max_batch_delay_ms: float = setting(2.0, "longest wait for a batch to fill once a request is in",
                                        env="MAX_BATCH_DELAY_MS", minimum=0)
    max_batch_files: int = setting(64, "images per request on /classify/batch, v1 and v2", env="MAX_BATCH_FILES",
                                   minimum=1)
    max_body_bytes: int = setting(10 * 1024 * 1024, "largest request body; larger ones get 413 before they are read",
                                  env="MAX_BODY_BYTES", minimum=1)
    max_image_side: int = setting(4096, "largest width or height accepted, checked before decoding",
                                  env="MAX_IMAGE_SIDE", minimum=1)
    decode_threads: int = setting(2, "image decoding threads", env="DECODE_THREADS", minimum=1)
    max_queue_images: int = setting(256, "images waiting for a forward pass before new requests get 503 + Retry-After",
                                    env="MAX_QUEUE_IMAGES", minimum=1)
    max_in_flight: int = setting(256, "prediction calls handled at once (uploading, decoding, queued, computing); "
                                 "beyond it a new call gets 503 + Retry-After before its body is read",
                                 env="MAX_IN_FLIGHT", minimum=1)
    request_timeout_s: float = setting(30.0, "deadline of a prediction call, body upload included; past it the caller "
                                       "gets 504", env="REQUEST_TIMEOUT_S", minimum=0.001)
    drain_timeout_s: int = setting(20, "after SIGTERM, how long admitted requests get to finish before the process "
                                   "exits", env="DRAIN_TIMEOUT_S", minimum=0)
    header_timeout_s: float = setting(10.0, "time a connection gets to send a request's line and headers from its first "
                                      "byte; past it 408 and the connection closes (an idle connection is closed after "
                                      "KServe's --timeout-keep-alive)", env="HEADER_TIMEOUT_S", minimum=0.01)
    max_header_bytes: int = setting(64 * 1024, "largest request line plus headers; larger: 431 and the connection "
                                    "closes", env="MAX_HEADER_BYTES", minimum=1024)
    max_connections: int = setting(2048, "open HTTP connections per process; at the bound a new connection closes the "
                                   "longest idle one, or with none idle gets 503 + Retry-After and is closed",
                                   env="MAX_CONNECTIONS", minimum=1)
    api_keys_file: Path | None = setting(
        None, "file with one API key per line (a mounted Secret); with keys configured (here or in env API_KEYS, "
        "comma-separated) prediction calls need 'Authorization: Bearer <key>' or 'X-API-Key'", env="API_KEYS_FILE",
        parse=Path)
    key_id_secret_file: Path | None = setting(
        None, "file holding the secret (at least 32 characters, one for every replica) under which API keys are named "
        "by HMAC-SHA256 in the cache and job owners (a mounted Secret; or env KEY_ID_SECRET). Required with API keys "
        "and --redis_url; without Redis each process draws its own", env="KEY_ID_SECRET_FILE", parse=Path)
    rate_limit_per_minute: int = setting(100, "prediction calls per minute per API key (per client address without "
                                         "keys), per replica; 0 turns it off", env="RATE_LIMIT_PER_MINUTE", minimum=0)
    trusted_proxy_hops: int = setting(
        0, "proxies in front that each append to X-Forwarded-For; without API keys the rate limit counts the address "
        "the outermost of them saw, the N-th entry from the right (fewer entries: the left-most); 0: the peer address, "
        "the header ignored (Envoy's xff_num_trusted_hops)", env="TRUSTED_PROXY_HOPS", minimum=0)
    engine: str = setting("auto", "onnx: ONNX Runtime with the shipped int8 graph (CPU; no compiler, no compile time); "
                          "torch: CUDA and every CPU precision; auto: onnx on the CPU for precision auto/int8, else torch",
                          env="ENGINE", choices=("auto", "onnx", "torch"))
    precision: str = setting("auto", "numeric precision of the forward pass; auto picks the fastest that keeps "
                             "accuracy on this device", env="PRECISION", choices=("auto", "fp32", "bf16", "int8", "fp16"))
    compile: bool = setting(True, "torch engine: torch.compile the forward pass at load (needs a C++ compiler; slower "
                            "start, faster serving; torch int8 always compiles)", env="COMPILE", parse=_boolean)
    intra_op_threads: int = setting(0, "threads of one forward pass (ONNX Runtime or torch); 0: the usable cores "
                                    "(affinity, cgroup CPU limit)", env="INTRA_OP_THREADS",
                                    minimum=0)
    ui: bool = setting(True, "serve the demo page at GET / (false: 404)", env="UI", parse=_boolean)
    request_log: bool = setting(False, "one log line per HTTP request (uvicorn's access log). Off by default: the mesh's "
                               "proxies log every request already, and under overload the line took 8 percent of the "
                               "server's time", env="REQUEST_LOG", parse=_boolean)
    max_explain_in_flight: int = setting(2, ":explain calls computing at once (fp32, outside the prediction batcher); "
                                         "beyond it a new one gets 503 + Retry-After", env="MAX_EXPLAIN_IN_FLIGHT",
                                         minimum=1)
    redis_url: str | None = setting(
        None, "redis://[:password@]host:port/db holding async jobs and the result cache, shared by every replica; "
        "without it both live in this process only (jobs lost on restart, one replica)", env="REDIS_URL", parse=str)
    max_job_files: int = setting(10_000, "images per async job (POST /classify/jobs)", env="MAX_JOB_FILES", minimum=1)
    max_job_bytes: int = setting(100 * 1024 * 1024, "largest POST /classify/jobs body (instead of --max_body_bytes)",
                                 env="MAX_JOB_BYTES", minimum=1)
    job_ttl_s: int = setting(86_400, "a job and its results are deleted this long after its last change",
                             env="JOB_TTL_S", minimum=1)
    job_chunk_size: int = setting(256, "images per unit of job work; a replica that dies loses at most its chunks in "
                                  "progress, which another replica redoes", env="JOB_CHUNK_SIZE", minimum=1)
    job_visibility_timeout_s: float = setting(60.0, "a chunk whose replica has not signalled for this long is taken "
                                              "over by another", env="JOB_VISIBILITY_TIMEOUT_S", minimum=0.1)
    job_owner_header: str | None = setting(
        None, "without API keys, the request header whose value owns a job (only its owner reads or cancels it; none: "
        "401). Only for a header the mesh sets from a verified token, such as Istio's outputClaimToHeaders with the "
        "JWT subject; a client could write it otherwise", env="JOB_OWNER_HEADER", parse=str)
    job_reads_per_minute: int = setting(600, "job status reads and cancellations per minute per API key (per client "
                                        "address without keys), per replica, counted apart from "
                                        "--rate_limit_per_minute; 0 turns it off", env="JOB_READS_PER_MINUTE", minimum=0)
    max_job_queued_bytes: int = setting(
        512 * 1024 * 1024, "job bytes one replica may hold: uploads being received (spooled to /tmp) plus, without "
        "Redis, the inputs of queued jobs; beyond it a job gets 503 + Retry-After", env="MAX_JOB_QUEUED_BYTES", minimum=1)
    max_job_queued_bytes_per_key: int = setting(
        256 * 1024 * 1024, "the same, per API key (per client address without keys); a job larger than it gets 413",
        env="MAX_JOB_QUEUED_BYTES_PER_KEY", minimum=1)
    cache_ttl_s: int = setting(3600, "how long a classification result stays cached (same image bytes, model version, "
                               "precision, top_k); 0 turns the cache off", env="CACHE_TTL_S", minimum=0)
    cache_shared_across_keys: bool = setting(
        False, "with API keys on, let every key read the cache entries of every other (a hit, or its speed, tells a key "
        "that another sent those exact bytes); false: entries are per key", env="CACHE_SHARED_ACROSS_KEYS",
        parse=_boolean)
    # Derived (settings_from) or KServe's own flags:
    api_keys: ApiKeys = field(default_factory=lambda: ApiKeys([]))
    workers: int = 1  # KServe's --workers


def declared() -> list[dataclasses.Field]:
    """The settings that are flags (and, most, env vars), in declaration order."""
    return [f for f in dataclasses.fields(Settings) if "help" in f.metadata]


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
    # KServe's per-request latency log line is off unless asked for: its request_{pre,post}process_seconds
    # and request_predict_seconds histograms, on /metrics, measure the same without a log line per call.
    parser.set_defaults(model_name=_env("MODEL_NAME", DEFAULT_MODEL_NAME), enable_docs_url=True,
                        enable_latency_logging=False)
    for f in declared():
        meta = f.metadata
        if f.type is bool and meta["parse"] is None:  # a switch without a value or an env var
            parser.add_argument(f"--{f.name}", action="store_true", help=meta["help"])
            continue
        parse = meta["parse"] or type(f.default)
        env = meta["env"]
        parser.add_argument(f"--{f.name}", type=parse, choices=meta["choices"],
                            default=_env(env, f.default, parse) if env else f.default,
                            help=meta["help"] + (f" [env {env}]" if env else ""))
    return parser


def load_api_keys(args: argparse.Namespace) -> ApiKeys:
    """The keys (env API_KEYS, --api_keys_file) and the secret naming them (--key_id_secret_file, else env
    KEY_ID_SECRET: like API_KEYS an environment variable only, never in a process's arguments or --help)."""
    id_secret = os.environ.get("KEY_ID_SECRET", "").strip() or None
    if args.key_id_secret_file:
        try:
            id_secret = Path(args.key_id_secret_file).read_text().strip() or None
        except OSError as exc:
            raise SystemExit(f"--key_id_secret_file: cannot read {args.key_id_secret_file} ({exc.strerror})") from None
    try:
        keys = ApiKeys.load(os.environ.get("API_KEYS", ""), args.api_keys_file, id_secret)
    except OSError as exc:
        raise SystemExit(f"--api_keys_file: cannot read {args.api_keys_file} ({exc.strerror})") from None
    if args.api_keys_file is not None and not keys.enabled:
        raise SystemExit(f"--api_keys_file: {args.api_keys_file} holds no keys; refusing to serve without the auth it asks for")
    if keys.enabled and id_secret is not None and len(id_secret) < ApiKeys.ID_SECRET_MIN_LENGTH:
        raise SystemExit(f"the key-id secret (KEY_ID_SECRET, --key_id_secret_file) must be at least "
                         f"{ApiKeys.ID_SECRET_MIN_LENGTH} characters (e.g. openssl rand -hex 32)")
    if keys.enabled and id_secret is None and args.redis_url:
        # Key ids own jobs and cache entries in Redis: a per-process secret would hide a job from its
        # owner on every other replica and after every restart.
        raise SystemExit("no key-id secret (KEY_ID_SECRET, --key_id_secret_file): with API keys and --redis_url, the ids "
                         "that own jobs and cache entries in Redis must be the same on every replica and across "
                         "restarts; give every replica one random value of at least 32 characters (the chart mounts "
                         "auth.apiKeys.existingSecret's key-id-secret)")
    return keys


def settings_from(args: argparse.Namespace) -> Settings:
    values = {}
    for f in declared():
        value = getattr(args, f.name)
        minimum = f.metadata["minimum"]
        if minimum is not None and value < minimum:
            raise SystemExit(f"--{f.name} must be >= {minimum}")
        values[f.name] = None if value == "" else value  # an empty optional string is unset
    if os.environ.get("TRUST_FORWARDED_FOR"):
        raise SystemExit("TRUST_FORWARDED_FOR is replaced by TRUSTED_PROXY_HOPS (--trusted_proxy_hops): the number of "
                         "proxies in front that append to X-Forwarded-For, 0 for none")
    values["model_dir"] = values["model_dir"] or default_model_dir()
    return Settings(**values, api_keys=load_api_keys(args), workers=args.workers)
