"""The dependency direction of DESIGN.md: deploy -> {attacks, cloud, fog, edge} -> protos + kernel.
No tier imports another tier; protos imports nothing of ours; kernel only protos."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"protos", "kernel", "edge", "fog", "cloud", "attacks", "deploy"}
ALLOWED = {
    "protos": {"protos"},
    "kernel": {"kernel", "protos"},
    "edge": {"edge", "kernel", "protos"},
    "fog": {"fog", "kernel", "protos"},
    "cloud": {"cloud", "kernel", "protos"},
    "attacks": {"attacks", "kernel", "protos"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & OURS


@pytest.mark.parametrize("tier", sorted(ALLOWED))
def test_tier_imports_only_what_the_design_allows(tier):
    bad = []
    for path in sorted((ROOT / tier).rglob("*.py")):
        extra = _imports(path) - ALLOWED[tier]
        if extra:
            bad.append(f"{path.relative_to(ROOT)} imports {sorted(extra)}")
    assert not bad, "; ".join(bad)


def test_edge_kernel_part_is_torch_free():
    """The kernel modules the edge uses never import torch at module level."""
    for name in ("config.py", "data.py", "partition.py", "mqtt.py", "errors.py", "__init__.py"):
        tree = ast.parse((ROOT / "kernel" / name).read_text())
        top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
        mods = {(a.name if isinstance(n, ast.Import) else n.module or "").split(".")[0]
                for n in top for a in (n.names if isinstance(n, ast.Import) else [n])}
        assert "torch" not in mods, name
