"""`python -m predictor`: KServe's ModelServer serving the CIFAR-10 classifier on port 8080."""

import logging
import sys

from predictor.engines.devices import default_front_ends
from predictor.serving import kserve_compat

kserve_compat.before_kserve_import(default_workers=default_front_ends())

from kserve import model_server  # noqa: E402

from predictor.app import install, install_in_worker, share_engine  # noqa: E402
from predictor.config import build_parser, settings_from  # noqa: E402
from predictor.core.drain import Drain  # noqa: E402
from predictor.engines.devices import EngineError  # noqa: E402
from predictor.model import Cifar10Classifier  # noqa: E402
from predictor.serving.grpc_server import GuardedGRPCServer  # noqa: E402
from predictor.weights import WeightsError  # noqa: E402

log = logging.getLogger("predictor")


def _configure_logging() -> None:
    """Our log lines (load, precision, drain) in KServe's format; KServe only configures its own loggers."""
    from kserve.logging import KSERVE_LOGGER_DATE_FORMAT, KSERVE_LOGGER_FORMAT

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(KSERVE_LOGGER_FORMAT, KSERVE_LOGGER_DATE_FORMAT))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def main() -> None:
    _configure_logging()
    args = build_parser(model_server.parser).parse_args()
    settings = settings_from(args)
    model = Cifar10Classifier(args.model_name, settings, Drain())
    try:
        kserve_compat.check_installed()
        model.load()
    except (WeightsError, EngineError, kserve_compat.IncompatibleKServe) as exc:
        log.error("cannot serve: %s", exc)
        sys.exit(2)
    hops = settings.trusted_proxy_hops
    log.info("API keys: %s; rate limit: %s; queue bound %d images; deadline %g s; drain %d s",
             f"{len(settings.api_keys)} configured" if settings.api_keys.enabled else "off (no keys configured)",
             f"{settings.rate_limit_per_minute}/min per {'key' if settings.api_keys.enabled else 'client'}, client = "
             + (f"X-Forwarded-For entry {hops} from the right ({hops} trusted proxy hop(s))" if hops else "peer address")
             if settings.rate_limit_per_minute else "off",
             settings.max_queue_images, settings.request_timeout_s, settings.drain_timeout_s)
    log.info("connections: head within %g s and %d bytes, at most %d open per process, idle %d s (--timeout-keep-alive); "
             "API key ids: %s", settings.header_timeout_s, settings.max_header_bytes, settings.max_connections,
             args.timeout_keep_alive, "-" if not settings.api_keys.enabled else
             "HMAC under the configured key-id secret" if settings.api_keys.id_secret_shared else "this process's own secret")
    limits = kserve_compat.ConnectionLimits(settings.header_timeout_s, settings.max_header_bytes, settings.max_connections)
    kserve_compat.configure_uvicorn(settings.request_log, limits)  # the client address is decided in one place: predictor.core.security
    kserve_compat.use_grpc_server(GuardedGRPCServer)
    if args.workers > 1:
        # This process keeps the engine and serves it to the front ends it starts (KServe's worker
        # processes), which install the app themselves; readiness waits for all of them.
        share_engine(model)  # its thread serves until the process exits
        kserve_compat.use_patient_workers(install_in_worker)
    else:
        install(model_server.app, model)
    # KServe hands grace_period to uvicorn as its graceful-shutdown timeout: the drain window.
    model_server.ModelServer(grace_period=settings.drain_timeout_s,
                             enable_latency_logging=args.enable_latency_logging).start([model])


if __name__ == "__main__":
    main()
