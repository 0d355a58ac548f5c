"""Conversions between the core model and the protobuf messages."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from agentapi_proxy.model import AgentInfo, Mode, State
from agentapi_proxy.v1 import agent_service_pb2 as pb

STATE_TO_PB = {
    State.PENDING: pb.AGENT_STATE_PENDING,
    State.STARTING: pb.AGENT_STATE_STARTING,
    State.READY: pb.AGENT_STATE_READY,
    State.UNREADY: pb.AGENT_STATE_UNREADY,
    State.FAILED: pb.AGENT_STATE_FAILED,
    State.STOPPING: pb.AGENT_STATE_STOPPING,
    State.DELETED: pb.AGENT_STATE_DELETED,
}
STATE_FROM_PB = {value: key for key, value in STATE_TO_PB.items()}
MODE_TO_PB = {Mode.PROCESS: pb.RUNTIME_MODE_PROCESS, Mode.STATEFULSET: pb.RUNTIME_MODE_STATEFULSET}


def timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment.astimezone(UTC))
    return stamp


def agent_to_pb(info: AgentInfo) -> pb.Agent:
    message = pb.Agent(
        agent_id=info.spec.agent_id,
        session_id=info.spec.session_id,
        owner=info.spec.owner,
        mode=MODE_TO_PB[info.mode],
        state=STATE_TO_PB[info.state],
        reason=info.reason,
        message=info.message,
        address=info.address,
        env=dict(info.spec.env),
        labels=dict(info.spec.labels),
        create_time=timestamp(info.create_time),
        restart_count=info.restart_count,
        log_tail=info.log_tail,
    )
    if info.ready_time is not None:
        message.ready_time.CopyFrom(timestamp(info.ready_time))
    if info.exit_code is not None:
        message.exit_code = info.exit_code
    return message
