"""The README's error table is the set of error codes the server can answer with: every code raised
anywhere in the serving code is documented, and every documented code is one the code raises."""

import ast
import re
from pathlib import Path

from predictor.core import errors
from predictor.jobs.core import StoreUnavailable
from predictor.serving import http_errors

ROOT = Path(__file__).parents[1]
SERVING_CODE = [p for p in (ROOT / "predictor").rglob("*.py") if "training" not in p.parts]


def error_kinds() -> set[str]:
    return {name for name, value in vars(errors).items() if isinstance(value, type) and issubclass(value, errors.ApiError)}


def raised_codes() -> set[str]:
    """The `code` of every domain error built in the serving code (its first argument, a string literal),
    the codes of the kinds that fix their own, those given to the framework's own HTTP errors, and those
    the HTTP protocol answers itself before any request reaches the app (connection limits)."""
    kinds = error_kinds()
    found = set()
    for path in SERVING_CODE:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
            if name in kinds and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                found.add(node.args[0].value)
    fixed = (errors.DeadlineExceeded(), errors.Overloaded("x"), errors.MethodNotAllowed("GET", "POST"), StoreUnavailable("x"))
    protocol = set(re.findall(r'"code": "([a-z_]+)"', (ROOT / "predictor" / "serving" / "kserve_compat.py").read_text()))
    return (found | {e.code for e in fixed} | set(http_errors.STARLETTE_CODES.values()) | {http_errors.OTHER_HTTP_ERROR}
            | protocol)


def documented_codes() -> set[str]:
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("### Errors"):readme.index("## Demo page")]
    rows = [line.split("|")[2] for line in table.splitlines() if re.match(r"^\| \d{3}\b", line)]
    return {code for row in rows for code in re.findall(r"`([a-z0-9_]+)`", row)}


def test_every_code_the_server_raises_is_in_the_readme_table():
    assert not raised_codes() - documented_codes(), "raised but not in the README's error table"


def test_every_documented_code_is_one_the_server_raises():
    assert not documented_codes() - raised_codes(), "in the README's error table but never raised"
