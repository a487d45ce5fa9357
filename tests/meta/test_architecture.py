"""The layering rules, checked on the source: no import circles among the project's modules, no module that
reads or writes the process environment but the settings and the CLI, shira_core free of service code, and no
core module reaching into another object's private attributes."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("shira_core", "service", "shira_cli", "shira_bench")
ENVIRONMENT_ALLOWED = ("service/config.py", "shira_cli/")  # the settings and the command line


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project's modules that `name` imports, type-only imports included (they are circles all the same)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def test_the_project_has_no_import_circles():
    mods = modules()
    graph = {name: imports(name, path, set(mods)) for name, path in mods.items()}
    # A package importing its own submodules (its __init__ re-exporting them) is not a circle.
    graph = {n: {t for t in ts if not t.startswith(n + ".")} for n, ts in graph.items()}
    circles = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert circles == []


def test_only_the_settings_and_the_cli_touch_the_environment():
    offenders = []
    for path in modules().values():
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(ENVIRONMENT_ALLOWED):
            continue
        text = path.read_text()
        if "os.environ" in text or "os.getenv" in text or "putenv" in text:
            offenders.append(rel)
    assert offenders == []


def test_the_core_library_imports_no_service_code():
    mods = modules()
    for name, path in mods.items():
        if name.startswith("shira_core"):
            assert not {t for t in imports(name, path, set(mods)) if not t.startswith("shira_core")}, name


# torch's JIT build folder: cpp_extension's public load() cannot import a prebuilt kernel without a compiler
# (shira_core.native._prebuilt, which falls back to load() if torch drops it).
PRIVATE_ALLOWED = {"cpp_extension._get_build_directory"}


def test_no_core_module_touches_another_objects_private_attributes():
    touched = []
    for name, path in modules().items():
        if not name.startswith("shira_core"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            private = isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
            own = private and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
            if private and not own and ast.unparse(node) not in PRIVATE_ALLOWED:
                touched.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)}")
    assert touched == []


def test_every_kernel_source_ships_in_the_wheel():
    """A kernel's name is its sources' hash, so an installed package (the image) needs the .cpp files to find its
    prebuilt .so: each must match pyproject's package-data."""
    import fnmatch
    import json
    import re

    table = (ROOT / "pyproject.toml").read_text().split("[tool.setuptools.package-data]", 1)[1]
    globs = json.loads(re.search(r"^shira_core = (\[.*\])$", table, re.M).group(1))  # tomllib is 3.11+
    sources = [p.relative_to(ROOT / "shira_core").as_posix() for p in (ROOT / "shira_core").rglob("*.cpp")]
    assert sources and all(any(fnmatch.fnmatch(s, g) for g in globs) for s in sources), (sources, globs)
