"""Benchmarks of agentapi-proxy against direct access and other proxies.

Run ``python -m bench.run`` from the repository root; see ``bench/README.md``.
"""
