"""The house rules of ARCHITECTURE.md, checked on the source: which room may import which, who imports Ray,
that a trainer can import the readers without Ray installed, and that modules stay small."""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "reinforge"

# each room may import itself and the rooms listed (every import, also those inside functions)
BELOW = {
    "io": set(),
    "formats": {"io"},
    "models": {"io", "formats"},
    "readers": {"io", "formats"},
    "stages": {"io", "formats", "models"},
    "runtime": {"io", "formats", "models", "stages"},
    "products": {"io", "formats", "models", "stages", "runtime", "readers"},
    "curation": {"io", "formats", "models", "stages", "runtime", "readers", "products"},
    "ops": {"io", "formats", "models", "stages", "runtime", "readers", "products", "curation"},
    "cli": {"io", "formats", "models", "stages", "runtime", "readers", "products", "curation", "ops"},
}
RAY_ALLOWED = ("runtime/", "readers/ray_data.py")  # the runtime, and the Ray Data loader trainers ask for
MAX_LINES = 400
# modules allowed past MAX_LINES: {path under reinforge/: why its size is earned}
LONG_MODULES: dict[str, str] = {}


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        yield rel, ast.parse(path.read_text(), rel)


def imported(tree) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            if node.module == "reinforge":
                names.update(f"reinforge.{a.name}" for a in node.names)
    return names


def test_every_module_lives_in_a_room():
    rooms = {rel.split("/")[0] for rel, _ in modules() if "/" in rel}
    assert rooms == set(BELOW), rooms ^ set(BELOW)


def test_rooms_import_only_rooms_below():
    wrong = []
    for rel, tree in modules():
        room = rel.split("/")[0]
        if room not in BELOW:
            continue
        for name in imported(tree):
            parts = name.split(".")
            if parts[0] == "reinforge" and len(parts) > 1 and parts[1] != room and parts[1] not in BELOW[room]:
                wrong.append(f"{rel} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_only_the_runtime_imports_ray():
    wrong = [f"{rel} imports {name}" for rel, tree in modules() for name in imported(tree)
             if name.split(".")[0] == "ray" and not rel.startswith(RAY_ALLOWED)]
    assert not wrong, "\n".join(wrong)


def test_readers_and_formats_import_without_ray_torch_models_or_runtime():
    readers = sorted(f"reinforge.readers.{p.stem}" for p in (PACKAGE / "readers").glob("*.py") if p.stem != "__init__")
    code = ("import sys; sys.modules['ray'] = None; sys.modules['datasets'] = None\n"
            f"import {', '.join(readers)}\n"
            "bad = [m for m in sys.modules if m.startswith(('reinforge.runtime', 'reinforge.products', "
            "'reinforge.curation', 'reinforge.ops', 'reinforge.stages', 'reinforge.models'))]\n"
            "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_modules_stay_small():
    """A module over MAX_LINES reads as more than one algorithm: split it, or say in LONG_MODULES why not."""
    sizes = {path.relative_to(PACKAGE).as_posix(): len(path.read_text().splitlines())
             for path in PACKAGE.rglob("*.py")}
    long = {rel: n for rel, n in sizes.items() if n > MAX_LINES and rel not in LONG_MODULES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
    stale = sorted(rel for rel in LONG_MODULES if sizes.get(rel, 0) <= MAX_LINES)
    assert not stale, f"LONG_MODULES lists modules that are gone or small now: {stale}"


def test_stages_share_only_the_base():
    """A stage imports no other stage: what two stages share (loading, preprocessing, precision) is in models/."""
    wrong = [f"{rel} imports {name}" for rel, tree in modules() if rel.startswith("stages/")
             for name in imported(tree) if name.startswith("reinforge.stages.") and name != "reinforge.stages.base"]
    assert not wrong, "\n".join(wrong)
