"""Each setting is declared once (predictor.config): the chart reaches every one, the chart's values
parse into what it means, and the README's flag table says what the declarations say."""

import re

import pytest

from predictor.config import Settings, build_parser, declared, settings_from

from .deploy_common import ROOT, predictor_container, render

# Settings the chart sets only when a value asks for it, and the values that do.
CONDITIONAL = {
    "REDIS_URL": ("redis.url=redis://redis:6379/0",),
    "API_KEYS_FILE": ("auth.apiKeys.existingSecret=cifar10-keys",),
    "KEY_ID_SECRET_FILE": ("auth.apiKeys.existingSecret=cifar10-keys", "redis.url=redis://redis:6379/0"),
    "JOB_OWNER_HEADER": ("auth.jwt.enabled=true", "auth.jwt.issuer=https://issuer.example",
                         "auth.jwt.jwksUri=https://issuer.example/jwks", "auth.jwt.ownerClaim=sub"),
}
# Settings the chart never sets, and why that is right.
NOT_IN_CHART = {"MODEL_DIR": "the chart serves model.storageUri, which the predictor reads from /mnt/models"}
# Where the chart's CPU-node defaults differ from the code's, on purpose.
CHART_CHOICES = {
    "trusted_proxy_hops": 4,  # auto: Knative mode behind the chart's Istio route (values.yaml says which hops)
    "intra_op_threads": 4,  # threads.intraOp 0: resources.limits.cpu (4) divided among the workers (1)
}


def chart_env(*sets: str) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in predictor_container(render(sets=sets))["env"]}


def test_every_setting_is_reachable_from_the_chart_values():
    default = chart_env()
    for f in declared():
        env = f.metadata["env"]
        if env is None or env in NOT_IN_CHART:
            continue
        if env in CONDITIONAL:
            assert env not in default, f"{env} set without the values that ask for it"
            assert env in chart_env(*CONDITIONAL[env]), f"{env}: not set by {CONDITIONAL[env]}"
        else:
            assert env in default, f"{env} (--{f.name}) cannot be set from the chart's values"


def test_the_charts_env_parses_into_the_declared_defaults(monkeypatch):
    from kserve import model_server

    for name, value in chart_env("gpu.enabled=false").items():
        monkeypatch.setenv(name, value)
    settings = settings_from(build_parser(model_server.parser).parse_args([]))
    expected = Settings()
    for f in declared():
        if f.name in ("model_dir", "api_keys_file"):
            continue
        want = CHART_CHOICES.get(f.name, getattr(expected, f.name))
        assert getattr(settings, f.name) == want, f.name


def readme_default(f) -> str:
    value = f.default
    if value is None:
        return "none"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`" if f.metadata["parse"] else "off"
    if isinstance(value, str):
        return f"`{value}`"
    return f"{value:g}" if isinstance(value, float) else str(value)


def test_the_readme_table_says_what_the_declarations_say():
    readme = (ROOT / "README.md").read_text()
    rows = {m.group(1): (m.group(2), m.group(3).strip()) for m in
            re.finditer(r"^\| `--(\w+)` \| (`[A-Z_]+`|—) \| ([^|]+) \|", readme, re.M)}
    for f in declared():
        assert f.name in rows, f"README's Configuration table has no --{f.name}"
        env, default = rows[f.name]
        assert env == (f"`{f.metadata['env']}`" if f.metadata["env"] else "—"), f.name
        if f.name != "model_dir":  # its default is a sentence (STORAGE_URI or the package)
            assert default == readme_default(f), (f.name, default)


@pytest.mark.parametrize("flag, value, message", [("--max_batch_size", "0", "--max_batch_size must be >= 1"),
                                                  ("--job_visibility_timeout_s", "0.05", "must be >= 0.1"),
                                                  ("--max_batch_delay_ms", "-1", "must be >= 0")])
def test_a_value_below_its_minimum_is_refused(flag, value, message):
    from kserve import model_server

    with pytest.raises(SystemExit, match=message):
        settings_from(build_parser(model_server.parser).parse_args([flag, value]))
