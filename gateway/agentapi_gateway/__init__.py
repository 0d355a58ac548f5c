"""The HTTP gateway: REST routes from the proto's ``google.api.http`` options,
translated to gRPC calls on the control plane, and a streaming proxy to agents.

The gateway holds no state and reaches the control plane only over gRPC.
"""

from agentapi_gateway.app import create_app, run_gateway

__all__ = ["create_app", "run_gateway"]
