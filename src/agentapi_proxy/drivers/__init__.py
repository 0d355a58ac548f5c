"""Drivers run agents: :mod:`.process` as local processes, :mod:`.statefulset` on Kubernetes."""
