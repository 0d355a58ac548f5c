"""The knobs a test turns: timings of the fake cluster and the faults it injects.

All of them are plain mutable state read by the server, the controllers and
the fake kubelet on the double's event loop; the harness changes them on that
loop too (see :class:`~tests.kube_double.harness.KubeDouble`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .status import JsonObject, reason_for_code, status_object


@dataclass
class Timings:
    """How long the fake cluster takes for each step (seconds); small so tests run fast."""

    schedule: float = 0.02
    bind: float = 0.05
    # From scheduled to the container running (image pull, container start).
    start: float = 0.1
    # From running to ready (the readiness probe passing).
    ready: float = 0.1
    # From a graceful pod delete to the pod gone (capped by its grace period).
    terminate: float = 0.1
    # ErrImagePull is shown this long before ImagePullBackOff.
    image_pull_backoff: float = 0.2
    # A crash-looping container runs this long before it exits ...
    crash_after: float = 0.2
    # ... and waits this long in CrashLoopBackOff before the next restart.
    crash_backoff: float = 0.3
    # Controllers re-check timed transitions at least this often.
    tick: float = 0.02
    bookmark_interval: float = 1.0
    # A watch without timeoutSeconds ends after this (the real server: 30-60 min).
    watch_default_timeout: float = 1800.0


@dataclass
class ErrorInjection:
    """Answer matching requests with ``code`` instead of serving them.

    ``verb``/``resource`` None match anything (``resource`` may name a subresource,
    ``pods/log``); ``times`` None means until removed.
    """

    code: int
    verb: str | None = None
    resource: str | None = None
    times: int | None = None
    message: str = ""
    retry_after: int | None = None

    def matches(self, verb: str, resource: str) -> bool:
        return (self.verb is None or self.verb == verb) and (
            self.resource is None or self.resource == resource
        )

    def status(self) -> JsonObject:
        message = self.message or {
            503: "the server is currently unable to handle the request",
            500: "an error on the server has prevented the request from succeeding",
            429: "the server has received too many requests and has asked us to try again later",
            504: "the server was unable to return a response in the time allotted, but may "
            "still be processing the request",
        }.get(self.code, "injected failure")
        return status_object(self.code, reason_for_code(self.code), message)


@dataclass(frozen=True)
class CrashLoop:
    exit_code: int = 1
    reason: str = "Error"
    # What every run prints just before it exits, as a crashing program would.
    last_words: bytes = b""


@dataclass
class Faults:
    """Faults of the fake cluster. Keys are pod names or images, as documented per field."""

    # Added to every API request matching (verb, resource) or to all when the key is None.
    latency: dict[tuple[str | None, str | None], float] = field(default_factory=dict)
    injections: list[ErrorInjection] = field(default_factory=list)
    # image -> pull error message; containers with that image never start.
    image_pull_failures: dict[str, str] = field(default_factory=dict)
    # pod name -> crash loop of all its containers.
    crash_loops: dict[str, CrashLoop] = field(default_factory=dict)
    # "cpu" or "memory": no node fits any new pod.
    insufficient: str | None = None
    # Message of a ProvisioningFailed event; PVCs then never bind.
    provisioning_failure: str | None = None
    # Pods whose containers run but never pass readiness.
    not_ready: set[str] = field(default_factory=set)

    def latency_for(self, verb: str, resource: str) -> float:
        total = 0.0
        for (want_verb, want_resource), seconds in self.latency.items():
            if (want_verb is None or want_verb == verb) and (
                want_resource is None or want_resource == resource
            ):
                total += seconds
        return total

    def clear_unavailable(self) -> None:
        """Remove the catch-all 503 that ``KubeDouble.set_unavailable`` adds."""
        self.injections = [
            i for i in self.injections if (i.code, i.verb, i.resource) != (503, None, None)
        ]

    def take_injection(self, verb: str, resource: str) -> ErrorInjection | None:
        """The first matching injection, counting one use of it."""
        for injection in self.injections:
            if injection.matches(verb, resource):
                if injection.times is not None:
                    injection.times -= 1
                    if injection.times <= 0:
                        self.injections.remove(injection)
                return injection
        return None
