"""A Kubernetes API server test double for provision-mode tests.

There is no cluster on the test machines. ``KubeDouble`` starts a real HTTP
server on 127.0.0.1 (port 0) that the official ``kubernetes`` client, pointed
at it through a real kubeconfig file with a bearer token, cannot tell from an
API server for what the StatefulSet driver uses:

- ``apps/v1`` statefulsets; ``v1`` services, configmaps, persistentvolumeclaims,
  pods (read and delete: pods come from the fake StatefulSet controller),
  events, namespaces (read); ``storage.k8s.io/v1`` storageclasses (read);
  ``pods/log`` (follow, tailLines, sinceSeconds, sinceTime, timestamps,
  previous, limitBytes) and ``pods/proxy`` to a local server a test registers;
  SelfSubjectAccessReview; ``/version``, ``/api``, ``/apis`` discovery.
- create / get / list (label and field selectors, limit/continue) / update
  (409 on a stale resourceVersion) / patch (strategic merge, merge, JSON patch,
  a simplified server-side apply) / delete (propagation policies, grace
  periods, finalizers) / deletecollection / watch (resourceVersion, timeouts,
  bookmarks, 410 Expired as an ERROR event), with ``Status`` errors worded as
  the real server words them.
- Validation of every received object against the OpenAPI schema bundled with
  ``kubernetes-validate`` (strict) plus the name, label, quantity and
  immutability rules the schema lacks; see :mod:`.validation` for where the
  double is stricter than a real server on purpose.
- A fake cluster: StatefulSet controller (PVCs from claim templates, pods
  labelled with the real ``controller-revision-hash``, so over-long names fail
  only for some templates: case K01), garbage collector, PVC binder and
  protection, scheduler and kubelet (Pending -> Running -> ready), and faults
  to inject (RBAC denials, image pull failures, unbindable claims, no
  capacity, crash loops, 5xx answers, latency, log output).

Threading: the server and the fake controllers run on their own event loop
in a thread of their own. Tests call the synchronous client directly (or via
``asyncio.to_thread`` from async code under test); the double never shares a
loop with the code under test, so a blocking client call cannot stall it and
``KubeDouble`` methods are safe from any thread. Every request is recorded
(``requests()``, ``permissions_used()``) to count API calls per operation and
check RBAC coverage.

Typical fixture::

    @pytest.fixture
    def kube(tmp_path):
        with KubeDouble(tmp_path) as double:
            yield double
            assert not double.internal_errors

Known gaps (none of them used by the driver): no managedFields or field
ownership (server-side apply is a strategic merge that may create), no
historical list snapshots (``resourceVersionMatch=Exact`` only checks the RV is
still kept), status subresource writes are refused, no TLS (the kubeconfig
points at ``http://``), Events only in ``core/v1``.
"""

from __future__ import annotations

from .faults import CrashLoop, ErrorInjection, Timings
from .harness import KubeDouble
from .rbac import PolicyRule
from .revision import revision_hash, revision_label
from .server import RecordedRequest

__all__ = [
    "CrashLoop",
    "ErrorInjection",
    "KubeDouble",
    "PolicyRule",
    "RecordedRequest",
    "Timings",
    "revision_hash",
    "revision_label",
]
