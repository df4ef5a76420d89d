"""`python -m predictor`: KServe's ModelServer serving the CIFAR-10 classifier on port 8080."""

import logging
import sys


def _docs_on_by_default() -> None:
    # kserve.model_server builds its FastAPI app from sys.argv at import time, with /docs off by
    # default; ours is on unless the user says otherwise. Spawned workers inherit sys.argv.
    if not any(a.startswith("--enable_docs_url") for a in sys.argv):
        sys.argv[1:1] = ["--enable_docs_url", "true"]


_docs_on_by_default()

import torch  # noqa: E402
from kserve import model_server  # noqa: E402

from .config import build_parser, settings_from  # noqa: E402
from .model import Cifar10Classifier  # noqa: E402
from .weights import WeightsError  # noqa: E402

log = logging.getLogger("predictor")


def main() -> None:
    args = build_parser(model_server.parser).parse_args()
    settings = settings_from(args)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    model = Cifar10Classifier(args.model_name, settings)
    try:
        model.load()
    except WeightsError as exc:
        logging.basicConfig()
        log.error("cannot serve: %s", exc)
        sys.exit(2)
    model_server.ModelServer().start([model])


if __name__ == "__main__":
    main()
