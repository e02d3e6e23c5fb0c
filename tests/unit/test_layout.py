"""The tree shows the architecture, and this test keeps it so: every import of the project's own
code, read from the source, must follow the dependency rule below (dependencies point one way).

    contract  <-  runtime  <-  amqp, storage  <-  bridge, worker, api (the services)
                                              <-  cli, devtools

`devtools` (the local stack, the simulator) is never imported by a service, and by the CLI only
inside the handler of a subcommand that needs it, so an install without extras runs the rest.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("gateway", "api", "bridge", "worker")

#: Each part of the code, and the parts it may import (besides itself).
ALLOWED: dict[str, set[str]] = {
    "gateway": set(),  # the package's __init__: the version only
    "gateway.contract": set(),
    "gateway.runtime": {"gateway", "gateway.contract"},
    "gateway.amqp": {"gateway", "gateway.contract", "gateway.runtime"},
    "gateway.storage": {"gateway", "gateway.contract", "gateway.runtime"},
    "gateway.devtools": {
        "gateway",
        "gateway.contract",
        "gateway.runtime",
        "gateway.amqp",
        "gateway.storage",
    },
    "gateway.cli": {
        "gateway",
        "gateway.contract",
        "gateway.runtime",
        "gateway.amqp",
        "gateway.storage",
    },
    "gateway.__main__": {"gateway.cli"},
}
SERVICES = ("api", "bridge", "worker")
for service in SERVICES:
    ALLOWED[service] = {
        "gateway",
        "gateway.contract",
        "gateway.runtime",
        "gateway.amqp",
        "gateway.storage",
    }
#: Imported only inside a function (lazily), by these parts only.
LAZY_ONLY = {"gateway.cli": {"gateway.devtools"}}


def part_of(module: str) -> str:
    """`gateway.storage.reads` -> `gateway.storage`; `api.ingest` -> `api`."""
    pieces = module.split(".")
    if pieces[0] == "gateway" and len(pieces) > 1:
        return ".".join(pieces[:2])
    return pieces[0]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported module, imported when the module loads?, line) for each import of ours."""
    tree = ast.parse(path.read_text(), str(path))
    found = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            # A function's body, and `if TYPE_CHECKING:`, run only when called or never.
            inner = top and not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                inner = False
            if isinstance(child, ast.Import):
                found.extend((alias.name, top, child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                base = child.module
                for alias in child.names:  # `from gateway import storage` imports gateway.storage
                    candidate = f"{base}.{alias.name}"
                    is_module = (ROOT / candidate.replace(".", "/")).is_dir() or (
                        ROOT / (candidate.replace(".", "/") + ".py")
                    ).is_file()
                    found.append((candidate if is_module else base, top, child.lineno))
            visit(child, inner)

    visit(tree, True)
    return [(name, top, line) for name, top, line in found if name.split(".")[0] in PACKAGES]


def sources() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def test_the_tree_has_the_parts_the_rule_names() -> None:
    parts = {part_of(module_name(p)) for p in sources()}
    assert set(ALLOWED) <= parts | {"gateway.__main__"}, set(ALLOWED) - parts
    # A new top-level module under gateway/ would sit beside the parts, outside the rule.
    loose = sorted(p.name for p in (ROOT / "gateway").glob("*.py"))
    assert loose == ["__init__.py", "__main__.py"], loose


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_dependency_rule(path: Path) -> None:
    me = part_of(module_name(path))
    if me.startswith("gateway.storage") and "migrations" in path.parts:
        me = "gateway.storage"
    allowed = ALLOWED[me] | {me}
    problems = []
    for name, top, line in project_imports(path):
        target = part_of(name)
        if target in allowed:
            continue
        if not top and target in LAZY_ONLY.get(me, set()):
            continue
        where = "at module level" if top else "inside a function"
        problems.append(f"line {line}: {me} imports {name} ({where})")
    assert not problems, "\n".join(problems)


def test_the_rule_catches_a_service_importing_devtools(tmp_path: Path) -> None:
    """The checker itself, on a file that breaks the rule: it must see the import."""
    bad = tmp_path / "probe.py"
    bad.write_text("from gateway.devtools.localstack import LocalStack\n")
    imports = project_imports(bad)
    assert [(part_of(name), top) for name, top, _ in imports] == [("gateway.devtools", True)]
    assert "gateway.devtools" not in ALLOWED["api"]
