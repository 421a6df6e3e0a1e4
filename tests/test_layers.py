"""The core's layers: each package of core/ imports only from itself and from the packages
below it, and plugins reach the core only through its public names (``harvest.core``).
docs/architecture.md describes the layers in this order."""

from __future__ import annotations

import ast

from conftest import REPO

# Lowest first; "" is core/'s own modules (errors, record, options, secrets, fields, hooks).
LAYERS = ("", "cleaning", "output", "download", "contract", "pipeline", "cluster", "commands")


def _package_of(module: str) -> str:
    """``harvest.core.download.fetch`` -> ``download``; ``harvest.core.errors`` -> ``""``."""
    parts = module.split(".")[2:]
    return parts[0] if len(parts) > 1 and parts[0] in LAYERS else ""


def _imports(path, module: str) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in a file, lazy ones inside functions too."""
    package = module.rsplit(".", 1)[0] if not path.name == "__init__.py" else module
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                if node.module is None:  # from . import x: x is a module of that package
                    found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
                    continue
            else:
                target = node.module
            found.append((node.lineno, target))
    return found


def _core_modules():
    for path in sorted((REPO / "core").rglob("*.py")):
        relative = path.relative_to(REPO / "core").with_suffix("")
        parts = [p for p in relative.parts if p != "__init__"]
        yield path, ".".join(["harvest", "core", *parts])


def upward_imports() -> list[str]:
    wrong = []
    for path, module in _core_modules():
        own = LAYERS.index(_package_of(module))
        for line, target in _imports(path, module):
            if not target.startswith("harvest.core.") or target.count(".") < 2:
                continue
            if LAYERS.index(_package_of(target)) > own:
                wrong.append(f"{path.relative_to(REPO)}:{line} imports {target}")
    return wrong


def test_no_layer_imports_a_higher_one():
    assert upward_imports() == []


def test_every_core_module_is_in_a_named_layer():
    stray = [str(p.relative_to(REPO)) for p in (REPO / "core").iterdir()
             if p.is_dir() and p.name not in LAYERS and p.name not in ("__pycache__", "static")
             and any(p.glob("*.py"))]
    assert stray == []


def test_plugins_use_only_the_public_core():
    import harvest.core

    wrong = []
    for path in sorted((REPO / "plugins").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and \
                    node.module.startswith("harvest.core"):
                names = {alias.name for alias in node.names}
                if node.module != "harvest.core" or names - set(harvest.core.__all__):
                    wrong.append(f"{path.relative_to(REPO)}:{node.lineno} {node.module}")
            elif isinstance(node, ast.Import) and any(
                    alias.name.startswith("harvest.core.") for alias in node.names):
                wrong.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert wrong == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The layer check itself: a lower module importing a higher one is reported."""
    import conftest

    fake = tmp_path / "repo"
    (fake / "core" / "output").mkdir(parents=True)
    (fake / "core" / "pipeline").mkdir(parents=True)
    (fake / "core" / "output" / "state.py").write_text(
        "def f():\n    from ..pipeline.engine import Engine\n")
    (fake / "core" / "pipeline" / "engine.py").write_text("from ..output import state\n")
    monkeypatch.setattr(conftest, "REPO", fake)
    monkeypatch.setitem(globals(), "REPO", fake)
    assert upward_imports() == ["core/output/state.py:2 imports harvest.core.pipeline.engine"]
