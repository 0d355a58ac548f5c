"""The layers stay layered: gateway -> control plane -> drivers -> core, never upwards."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "agentapi_proxy"
GATEWAY = ROOT / "gateway" / "agentapi_gateway"

CORE = {
    "errors", "ids", "model", "settings", "settings_env", "logconfig", "stateboard", "logs",
    "shim", "auth", "metrics", "v1", "http_rules", "paging", "inotify", "tunnel_frames", "upstream",
}  # fmt: skip
DRIVERS = {"drivers"}
CONTROL_PLANE = {"service", "status", "traffic", "tunnel", "server", "wire"}
ENTRY = {"cli", "client_cli", "__main__", "reference_agent", "__init__"}
LAYER_OF = {
    **{m: 0 for m in CORE},
    **{m: 1 for m in DRIVERS},
    **{m: 2 for m in CONTROL_PLANE},
    **{m: 3 for m in ENTRY},
}
# What the gateway may use of the control plane's package: the API, settings, errors
# and shared plumbing; never drivers or anything that reaches agents or clusters.
GATEWAY_MAY_IMPORT = {
    "v1", "settings", "errors", "logconfig", "metrics", "http_rules", "upstream",
    "tunnel_frames",
}  # fmt: skip


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def top_module(path: Path) -> str:
    return path.relative_to(SRC).parts[0].removesuffix(".py")


def own_imports(path: Path, package: str) -> set[str]:
    return {
        name.split(".")[1]
        for name in imported_modules(path)
        if name.startswith(package + ".") and len(name.split(".")) > 1
    }


SOURCES = sorted(p for p in SRC.rglob("*.py") if "v1" not in p.relative_to(SRC).parts)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_module_imports_a_higher_layer(path: Path) -> None:
    layer = LAYER_OF[top_module(path)]
    for name in own_imports(path, "agentapi_proxy"):
        if name in LAYER_OF:
            assert LAYER_OF[name] <= layer, f"{path.name} (layer {layer}) imports {name}"
    if top_module(path) != "cli":
        assert not any(m.startswith("agentapi_gateway") for m in imported_modules(path)), path


@pytest.mark.parametrize("path", sorted(GATEWAY.rglob("*.py")), ids=lambda p: p.name)
def test_gateway_uses_only_the_api_of_the_control_plane(path: Path) -> None:
    used = own_imports(path, "agentapi_proxy")
    assert used <= GATEWAY_MAY_IMPORT, f"{path.name} imports {used - GATEWAY_MAY_IMPORT}"
    assert not any(m.startswith("kubernetes") for m in imported_modules(path))


def test_the_layer_table_knows_every_module() -> None:
    assert {top_module(p) for p in SOURCES} <= set(LAYER_OF)
