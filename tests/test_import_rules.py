"""docs/ARCHITECTURE.md's "who may import whom", enforced on every module's imports
(parsed with ast, so lazy imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("agent", "drivers", "policies", "simulators")
# The observation/action contract every policy family shares; `policies.rl.codec` is
# the RL family's encoding of it (the gym envs and the live RL policy use the same one).
CONTRACT = ("policies.contract", "policies.rl.codec")
FORBIDDEN = {
    "agent": ("simulators",),
    "drivers": ("policies", "agent"),
    "policies": ("drivers", "agent", "simulators"),
    "simulators": ("agent", "drivers"),
}


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def _violations() -> list[str]:
    out = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for line, module in _imports(path):
                top = module.split(".")[0]
                if top in FORBIDDEN[package]:
                    out.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
                if (
                    package == "simulators"
                    and top == "policies"
                    and not module.startswith(CONTRACT)
                ):
                    out.append(f"{path.relative_to(ROOT)}:{line} imports {module} (not contract)")
    return out


def test_no_module_imports_against_the_architecture() -> None:
    assert _violations() == []


def test_the_check_sees_lazy_imports(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from simulators.spm import X\n    import agent.cli\n")
    assert [m for _, m in _imports(module)] == ["simulators.spm", "agent.cli"]


def test_agent_is_sub_packages_by_job() -> None:
    """A newcomer reads the agent from its folder names: only the CLI and the config
    schema live at the top; everything else sits in a sub-package named for its job."""
    top = sorted(p.name for p in (ROOT / "agent").glob("*.py"))
    assert top == ["__init__.py", "cli.py", "config.py"]
    for package in (ROOT / "agent").iterdir():
        if package.is_dir() and package.name != "__pycache__" and any(package.glob("*.py")):
            init = package / "__init__.py"
            assert init.exists() and ast.get_docstring(ast.parse(init.read_text())), package
