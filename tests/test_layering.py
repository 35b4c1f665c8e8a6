"""The core (cl_lightning/) does not import the streams or the strategies: datamodules
and callbacks build on the core; only the CLI wires them together."""

import ast

from tests.conftest import ROOT

WIRING = {"cl_lightning/cli.py"}  # the one place that knows every layer


def imported_modules(path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):  # function-level imports count too
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_core_imports_neither_datamodules_nor_callbacks_except_the_cli():
    offenders = {}
    for path in sorted((ROOT / "cl_lightning").rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        if rel in WIRING:
            continue
        bad = {m for m in imported_modules(path)
               if m.split(".")[0] in ("datamodules", "callbacks")}
        if bad:
            offenders[rel] = sorted(bad)
    assert not offenders, f"core modules importing outer layers: {offenders}"


def test_the_check_sees_an_import_inside_a_function(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from datamodules.base import TaskData\n")
    assert "datamodules.base" in imported_modules(probe)
