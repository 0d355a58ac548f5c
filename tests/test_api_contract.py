"""The API as published: generated code matches proto/, and the design's routes exist."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from google.api import annotations_pb2

from agentapi_proxy.v1 import agent_service_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent


def test_committed_generated_code_matches_the_proto(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "protogen.py"), "generate", str(tmp_path)],
        check=True,
    )
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert generated, "protoc produced nothing"
    for relative in generated:
        committed = ROOT / "src" / relative
        assert committed.exists(), f"{relative} is not committed: run tools/protogen.py generate"
        assert committed.read_bytes() == (tmp_path / relative).read_bytes(), (
            f"src/{relative} is stale: run `python tools/protogen.py generate`"
        )


def _bindings() -> set[tuple[str, str, str]]:
    found = set()
    for method in pb.DESCRIPTOR.services_by_name["AgentService"].methods:
        if not method.GetOptions().HasExtension(annotations_pb2.http):
            continue
        rule = method.GetOptions().Extensions[annotations_pb2.http]
        for binding in (rule, *rule.additional_bindings):
            kind = binding.WhichOneof("pattern")
            if kind == "custom":
                found.add((method.name, binding.custom.kind, binding.custom.path))
            else:
                found.add((method.name, kind.upper(), getattr(binding, kind)))
    return found


def test_design_document_route_creates_agents() -> None:
    assert ("CreateAgent", "POST", "/sessions/{session_id}/agents") in _bindings()


# The gateway's internal fast path for agent traffic; callers use ProxyHTTP's route.
INTERNAL_METHODS = {"TunnelHTTP"}


def test_every_method_but_the_internal_ones_has_a_rest_binding() -> None:
    methods = {m.name for m in pb.DESCRIPTOR.services_by_name["AgentService"].methods}
    assert INTERNAL_METHODS <= methods
    assert {name for name, _, _ in _bindings()} == methods - INTERNAL_METHODS
