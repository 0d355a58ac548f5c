"""RBAC as the double enforces it: the rules granted to the one service account.

Rules are like a Role's ``rules`` (verbs x apiGroups x resources, optional
resourceNames, ``*`` wildcards, ``pods/log`` for a subresource). ``deny`` is a
test convenience RBAC does not have: it removes one permission from whatever
the rules grant. Discovery paths (/version, /api, /apis, ...) are open to any
authenticated user, as with the default ``system:discovery`` role.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from .status import ApiError, forbidden, forbidden_path


@dataclass(frozen=True)
class PolicyRule:
    """One RBAC rule, e.g. ``PolicyRule(("get", "list"), ("apps",), ("statefulsets",))``."""

    verbs: tuple[str, ...]
    api_groups: tuple[str, ...] = ("",)
    resources: tuple[str, ...] = ()
    resource_names: tuple[str, ...] = ()

    def allows(self, attrs: Attributes) -> bool:
        resource = attrs.full_resource
        return (
            ("*" in self.verbs or attrs.verb in self.verbs)
            and ("*" in self.api_groups or attrs.group in self.api_groups)
            and (
                "*" in self.resources
                or resource in self.resources
                or (bool(attrs.subresource) and f"*/{attrs.subresource}" in self.resources)
            )
            and (not self.resource_names or attrs.name in self.resource_names)
        )


ALLOW_ALL: Final = (PolicyRule(verbs=("*",), api_groups=("*",), resources=("*",)),)


@dataclass(frozen=True)
class Attributes:
    """What a request asks to do, as the authorizer sees it."""

    user: str
    verb: str
    group: str = ""
    resource: str = ""
    subresource: str = ""
    namespace: str = ""
    name: str = ""
    path: str = ""

    @property
    def is_resource_request(self) -> bool:
        return bool(self.resource)

    @property
    def full_resource(self) -> str:
        return f"{self.resource}/{self.subresource}" if self.subresource else self.resource


@dataclass
class Authorizer:
    """Decides requests from ``rules`` minus ``denied`` (verb, group, resource[/sub])."""

    rules: tuple[PolicyRule, ...] = ALLOW_ALL
    denied: set[tuple[str, str, str]] = field(default_factory=set)

    def allows(self, attrs: Attributes) -> bool:
        if not attrs.is_resource_request:
            return True
        if (attrs.verb, attrs.group, attrs.full_resource) in self.denied:
            return False
        return any(rule.allows(attrs) for rule in self.rules)

    def deny(self, verb: str, resource: str, *, group: str = "") -> None:
        self.denied.add((verb, group, resource))

    def allow(self, verb: str, resource: str, *, group: str = "") -> None:
        self.denied.discard((verb, group, resource))

    def set_rules(self, rules: Iterable[PolicyRule]) -> None:
        self.rules = tuple(rules)
        self.denied.clear()

    def check(self, attrs: Attributes) -> None:
        """Raise 403 Forbidden, worded as the real API server words it, unless allowed."""
        if self.allows(attrs):
            return
        raise forbidden_error(attrs)

    def allow_reason(self, attrs: Attributes) -> str:
        """The ``reason`` of an allowing SelfSubjectAccessReview, worded like RBAC's."""
        subject = f'User "{attrs.user}"'
        if attrs.user.startswith("system:serviceaccount:"):
            namespace, _, name = attrs.user.removeprefix("system:serviceaccount:").partition(":")
            subject = f'ServiceAccount "{name}/{namespace}"'
        return f'RBAC: allowed by RoleBinding "kube-double" of Role "kube-double" to {subject}'


def forbidden_message(attrs: Attributes) -> str:
    if not attrs.is_resource_request:
        return f'User "{attrs.user}" cannot {attrs.verb} path "{attrs.path}"'
    scope = f'in the namespace "{attrs.namespace}"' if attrs.namespace else "at the cluster scope"
    return (
        f'User "{attrs.user}" cannot {attrs.verb} resource "{attrs.full_resource}" '
        f'in API group "{attrs.group}" {scope}'
    )


def forbidden_error(attrs: Attributes) -> ApiError:
    if not attrs.is_resource_request:
        return forbidden_path(forbidden_message(attrs))
    return forbidden(attrs.resource, attrs.group, attrs.name, forbidden_message(attrs))
