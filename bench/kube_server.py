"""The Kubernetes test double in a process of its own, driven over stdin/stdout.

``python -m bench.kube_server DIRECTORY --namespace NS`` starts
:class:`tests.kube_double.KubeDouble` in ``DIRECTORY`` (kubeconfig there),
granting exactly the driver's ``REQUIRED_RBAC_RULES``, and prints one JSON
line ``{"kubeconfig": ..., "namespace": ..., "pid": ...}``. Then it answers one
JSON line per command line on stdin:

- ``requests``: ``{"total": N, "by_call": {"list statefulsets": n, ...}}`` for the
  requests received since the last ``clear``;
- ``clear``: forget the requests received so far, ``{"ok": true}``;
- ``internal_errors``: ``{"internal_errors": [...]}`` (bugs of the double itself);
- ``stop`` or end of input: stop the double and exit 0.

Why a process: the double's server and fake controllers are Python on an
event loop; in the bench process they would hold its GIL while the bench
times the control plane, and their CPU and memory would mix with the client's.

"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from agentapi_proxy.drivers.statefulset_objects import REQUIRED_RBAC_RULES
from tests.kube_double import KubeDouble, PolicyRule, RecordedRequest


def granted_rules() -> list[PolicyRule]:
    """What the control plane's Role grants: exactly ``REQUIRED_RBAC_RULES``."""
    return [
        PolicyRule(verbs=rule.verbs, api_groups=(rule.api_group,), resources=(rule.resource,))
        for rule in REQUIRED_RBAC_RULES
    ]


def summarize(requests: list[RecordedRequest]) -> dict[str, Any]:
    """Request counts by "verb resource" (e.g. "watch pods", "get pods/log")."""
    by_call = Counter(
        f"{r.verb} {r.full_resource}" if r.resource else f"{r.verb} {r.path}" for r in requests
    )
    return {"total": len(requests), "by_call": dict(sorted(by_call.items()))}


def _answer(reply: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()


def serve(kube: KubeDouble) -> None:
    """Answer commands from stdin until ``stop`` or its end."""
    for line in sys.stdin:
        command = line.strip()
        if command == "requests":
            _answer(summarize(kube.requests()))
        elif command == "clear":
            kube.clear_requests()
            _answer({"ok": True})
        elif command == "internal_errors":
            _answer({"internal_errors": kube.internal_errors})
        elif command == "stop":
            return
        else:
            _answer({"error": f"unknown command {command!r}"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kube_server")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--namespace", default="agentapi-bench")
    args = parser.parse_args(argv)

    # stop() runs here, on the main thread outside any event loop, and is bounded (30 s).
    with KubeDouble(args.directory, namespace=args.namespace) as kube:
        kube.set_rbac_rules(granted_rules())
        hello = {
            "kubeconfig": str(kube.kubeconfig),
            "namespace": kube.namespace,
            "pid": os.getpid(),
        }
        _answer(hello)
        serve(kube)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
