"""`python -m predictor` with the bench's null engine (bench/null_engine.py) instead of the one
predictor.engines.selection would build: the same flags, the same server, no model cost. For
bench/stack_cost.py only; the predictor itself has no such option.

    .venv/bin/python bench/null_predictor.py --http_port 8080 --rate_limit_per_minute 0 --cache_ttl_s 0
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    import predictor.__main__ as entry  # imports KServe in the order the predictor needs
    import predictor.model
    from bench.null_engine import NullEngine

    def build_engine(card: dict, model_dir, *, max_batch_size: int = 32, **_) -> NullEngine:
        return NullEngine(max_batch_size)

    predictor.model.build_engine = build_engine  # Cifar10Classifier.load looks it up here
    entry.main()


if __name__ == "__main__":
    main()
