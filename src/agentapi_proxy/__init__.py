"""agentapi-proxy: a control plane for AI coding-agent servers."""

__version__ = "0.1.0"
