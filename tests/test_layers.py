"""The package's layers point only down, and no module imports itself back through others.

Every `import` of ours in every module (top-level, inside functions, and under TYPE_CHECKING alike) is
read from the source, so an upward or circular import fails here even when it sits in a function that
no other test calls. The layers, bottom to top, as the README's Layout draws them.
"""

import ast
import tomllib
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "predictor"

# Bottom to top: a module may import its own layer and the ones below, never one above.
LAYERS = (
    ("identity", ("predictor.cifar", "predictor.network", "predictor.weights", "predictor.redis_client")),
    ("engines", ("predictor.engines",)),
    ("core", ("predictor.core",)),
    ("settings", ("predictor.config",)),
    ("data plane and kserve.Model", ("predictor.payloads", "predictor.dataplane", "predictor.protocols",
                                     "predictor.model", "predictor.jobs.core", "predictor.jobs.memory_store",
                                     "predictor.jobs.redis_store")),
    ("edges", ("predictor.serving", "predictor.jobs.api")),
    ("composition root", ("predictor.app",)),
    ("entry point", ("predictor.__main__",)),
)
# Build-time code (training, quantization, evaluation) stands beside the stack: it may use any layer
# up to the kserve.Model, and nothing that serves may import it (the images ship without it).
BUILD_TIME = "predictor.training"
# KServe's patches must not depend on what they patch KServe for: what they install is handed to them.
IMPORTS_NOTHING_OF_OURS = ("predictor.serving.kserve_compat",)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Our modules `path` imports (a `from package import name` counts as the submodule when one exists)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "predictor"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "predictor":
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if module_path(submodule) is not None else node.module)
    return found


def module_path(name: str) -> Path | None:
    base = PACKAGE.parent.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def layer_of(name: str) -> int | None:
    for level, (_, prefixes) in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return level
    return None


def graph() -> dict[str, set[str]]:
    return {module_name(path): imports_of(path) for path in PACKAGE.rglob("*.py")}


def test_every_module_has_a_layer():
    packages = {module_name(path) for path in PACKAGE.rglob("__init__.py")}  # docstrings only
    unplaced = [m for m in graph() if layer_of(m) is None and not m.startswith(BUILD_TIME) and m not in packages]
    assert not unplaced, f"modules in no layer (add them to LAYERS and the README's Layout): {unplaced}"


def test_packages_only_describe_themselves():
    packages = {module_name(path): imports_of(path) for path in PACKAGE.rglob("__init__.py")}
    assert not {name: imported for name, imported in packages.items() if imported}


def test_no_import_points_up():
    upward = []
    for module, imported in graph().items():
        own = layer_of(module)
        if module.startswith(BUILD_TIME):
            own = layer_of("predictor.model")
        if own is None:
            continue
        for target in imported:
            if target.startswith(BUILD_TIME) and not module.startswith(BUILD_TIME):
                upward.append(f"{module} -> {target} (build-time code, absent from the images)")
            elif (level := layer_of(target)) is not None and level > own:
                upward.append(f"{module} ({LAYERS[own][0]}) -> {target} ({LAYERS[level][0]})")
    assert not upward, "imports that point up the layers:\n" + "\n".join(sorted(upward))


def test_the_kserve_patches_import_nothing_of_ours():
    for module in IMPORTS_NOTHING_OF_OURS:
        assert not imports_of(module_path(module)), module


def test_no_import_cycle():
    imports = graph()
    edges = {module: {t for t in imported if t in imports} for module, imported in imports.items()}
    cycles, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_every_package_ships_in_the_wheel():
    """The images install the project as a wheel, which holds only the packages pyproject.toml lists (an
    editable install finds any directory, so nothing else here would notice one missing)."""
    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {module_name(path) for path in PACKAGE.rglob("__init__.py")}
    assert packages <= listed, f"not in pyproject.toml's [tool.setuptools] packages: {sorted(packages - listed)}"
