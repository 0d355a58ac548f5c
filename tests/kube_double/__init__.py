"""A Kubernetes API server test double for provision-mode tests.

There is no cluster on the test machines. :class:`KubeDouble` starts a real
HTTP server on 127.0.0.1 (port 0) that the official ``kubernetes`` client,
pointed at it through a real kubeconfig file with a bearer token, cannot tell
from an API server for what the StatefulSet driver uses:

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
  ``kubernetes-validate`` (strict), plus the name, label, quantity and
  immutability rules the schema lacks.
- A fake cluster: StatefulSet controller (claims from templates, pods labelled
  with the real ``controller-revision-hash``, so over-long set names fail only
  for some templates: case K01), garbage collector, PVC binder and protection,
  scheduler and kubelet (Pending -> Running -> ready), and faults to inject.

Threading: the server and the fake controllers run on their own event loop
in a thread of their own. Tests call the synchronous client directly (async
code under test calls it through ``asyncio.to_thread`` as it would anyway);
the double never shares a loop with the code under test, so a blocking client
call cannot stall it. Every ``KubeDouble`` method is thread-safe and returns
within milliseconds (``stop`` waits up to 2 s for open streams).

Typical fixture::

    @pytest.fixture
    def kube(tmp_path):
        with KubeDouble(tmp_path) as double:
            yield double
            assert not double.internal_errors

    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(
        config_file=str(kube.kubeconfig), client_configuration=configuration
    )

Where the double differs from a real API server, on purpose:

- An unknown field is 422 Invalid; the real server (fieldValidation=Warn)
  drops it with a warning, which hides typos. (The v37 client already refuses
  unknown fields in dict bodies before sending.)
- A malformed quantity (``cpu: 12xyz``) is 400 BadRequest "... cannot be
  handled as a StatefulSet: quantities must match ...", as on a real server:
  quantities are parsed while decoding, before validation.
- Readiness is a timer (``Timings.ready``) and a knob (``set_ready``); probes
  are not run against the servers registered with ``serve_pod``.

Known gaps (none used by the driver): no managedFields or field ownership
(server-side apply is a strategic merge that may create), no historical list
snapshots (``resourceVersionMatch=Exact`` only checks the version is still
kept), status subresource writes are refused, no TLS (the kubeconfig points at
``http://``), Events only in ``core/v1``, no Services proxy.
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
