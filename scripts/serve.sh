#!/usr/bin/env bash
# Sets up .venv and runs the control plane and the gateway on the embedded
# default: legacy mode, the reference agent, gateway on http://127.0.0.1:8080.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
exec "$root/.venv/bin/agentapi-proxy" serve "$@"
