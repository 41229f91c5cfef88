"""The layering contract of the package (docs/architecture.md): every import runs downward.

ground (config, errors) → flags, domain (text, audio, model, vocoder, request; solvers, checkpoints and pacing over them)
→ sampler, model_paths, engines → export → cache, guards → pipeline → streaming → stream_scheduler → hosts (client, serving,
supervisor) → repository → gateway, build → cli. Benchmark and soak support (benchmarks/) is outside the package. A module may import its own unit (e.g. serving.* from serving.*) and any unit ranked lower;
never one ranked the same or higher. A new module must be given its place here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "f5_triton"

RANKS: dict[str, int] = {
    "f5_triton": 0, "f5_triton.config": 0, "f5_triton.errors": 0,
    "f5_triton.flags": 1, "f5_triton.text": 1, "f5_triton.audio": 1, "f5_triton.model": 1, "f5_triton.vocoder": 1,
    "f5_triton.request": 1,
    "f5_triton.solvers": 2, "f5_triton.checkpoints": 2, "f5_triton.pacing": 2,
    "f5_triton.sampler": 3, "f5_triton.engines": 3, "f5_triton.model_paths": 3,
    "f5_triton.export": 4,
    "f5_triton.cache": 5, "f5_triton.guards": 5,
    "f5_triton.pipeline": 6,
    "f5_triton.streaming": 7,
    "f5_triton.stream_scheduler": 8,
    "f5_triton.client": 9, "f5_triton.serving": 9, "f5_triton.supervisor": 9,
    "f5_triton.repository": 10,
    "f5_triton.gateway": 11, "f5_triton.build": 11,
    "f5_triton.cli": 12,
}


def unit_of(module: str) -> str | None:
    """The longest entry of RANKS that is `module` or a package above it."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        name = ".".join(parts[:end])
        if name in RANKS:
            return name
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every f5_triton import in the file, inside functions and TYPE_CHECKING blocks too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("f5_triton"):
            # `from f5_triton import audio` imports the module f5_triton.audio
            found += [(node.lineno, f"{node.module}.{a.name}" if node.module == "f5_triton" else node.module)
                      for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("f5_triton")]
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_imports_run_downward(path):
    source = module_name(path)
    source_unit = unit_of(source)
    assert source_unit is not None, f"{source} has no place in the layers: add it to RANKS in {__file__}"
    upward = []
    for line, target in imported_modules(path):
        target_unit = unit_of(target)
        assert target_unit is not None, f"{source} imports {target}, which has no place in RANKS"
        if target_unit != source_unit and RANKS[target_unit] >= RANKS[source_unit]:
            upward.append(f"line {line}: {target} (rank {RANKS[target_unit]} >= {source_unit}'s {RANKS[source_unit]})")
    assert not upward, f"{source} imports sideways or upward:\n  " + "\n  ".join(upward)


def test_the_contract_sees_every_import_form(tmp_path):
    """The checker itself: plain, from-package, nested-in-function and TYPE_CHECKING imports are all found."""
    sample = tmp_path / "sample.py"
    sample.write_text("from typing import TYPE_CHECKING\nimport f5_triton.cli\nfrom f5_triton import audio\n"
                      "if TYPE_CHECKING:\n    from f5_triton.pipeline import TTS\n"
                      "def f():\n    from f5_triton.serving import factories\n")
    assert [m for _, m in imported_modules(sample)] == ["f5_triton.cli", "f5_triton.audio", "f5_triton.pipeline",
                                                       "f5_triton.serving"]
    assert unit_of("f5_triton.serving.factories") == "f5_triton.serving" and unit_of("f5_triton.nothing") == "f5_triton"


def test_the_supervisor_imports_no_pipeline_or_model_code():
    """The tritonserver supervisor runs in processes that never load a model: only ground-floor imports."""
    allowed = {"f5_triton.config", "f5_triton.errors"}
    for path in sorted((PACKAGE / "supervisor").glob("*.py")):
        for line, target in imported_modules(path):
            assert target in allowed or target.startswith("f5_triton.supervisor"), f"{path.name}:{line} imports {target}"


def test_no_import_circle():
    """No module imports, even for typing only, a module that imports it back (a package's own `__init__`
    aside): the supervisor's watchdog knows the server it watches through a Protocol."""
    names = {module_name(path) for path in MODULES}
    graph = {}
    for path in MODULES:
        source, targets = module_name(path), set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("f5_triton"):
                targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in names else node.module
                            for a in node.names}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name in names}
        graph[source] = {t for t in targets if t in names and not source.startswith(t + ".")}
    circles = [(a, b) for a in graph for b in graph[a] if a < b and a in graph.get(b, ())]
    assert not circles, f"modules importing each other: {circles}"
