"""What one controller replica needs (``ControllerConfig``, checked when built) and its default name."""

from __future__ import annotations

__all__ = ["DEFAULT_SHARED_GROUP", "ControllerConfig", "default_replica_id"]

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from edgeship.ota.errors import BadInputError
from edgeship.ota.topics import DEFAULT_PREFIX, validate_identifier
from edgeship.ota.transport import BrokerUrl
from edgeship.toolkit.report_reread import ReportRereadPolicy

DEFAULT_SHARED_GROUP = "edgeship-controllers"


def default_replica_id() -> str:
    """``<host>-<pid>``: unique per process, so two replicas never share an MQTT client id."""
    host = socket.gethostname().split(".")[0] or "host"
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in host)[:40]
    return f"{safe}-{os.getpid()}"


@dataclass
class ControllerConfig:
    """What one controller replica needs. Times in seconds.

    Attributes:
        broker: ``mqtt://HOST:PORT`` / ``mqtts://HOST:PORT`` or a parsed BrokerUrl.
        repo: the release repository folder (metadata/, targets/, director/).
        db_url: the store's SQLAlchemy URL.
        replica_id: this replica's name (MQTT client id suffix and outbox claim owner).
        fleet: ``"+"`` for every fleet, or one fleet.
        shared_group: the MQTT 5 shared-subscription group; None subscribes with plain filters.
        tick_s: the reconcile period (RUNNING and PAUSED rollouts, A/B tests, the outbox).
        late_joiner_check_s: how often COMPLETED rollouts are reconciled (for devices that join later).
        batch_max, batch_wait_s: an ingest batch holds at most this many messages and waits at
            most this long for more after its first one.
        queue_max: ingest queue bound (messages); with the batch bounds it bounds the lag.
        desired_expires_s: validity of a signed desired state.
        desired_renew_s: re-issue a device's desired state when it expires within this.
        refresh_check_s: how often to check whether the timestamp needs re-signing.
        metrics_port: serve Prometheus metrics on this port (None: no HTTP server; 0: any free port).
        metrics_window_s: the telemetry window of the fleet latency and error metrics.
        telemetry_retention_s: telemetry older than this is pruned (hourly).
        report_reread: when to read a silent device's retained report again (a lost report's
            second chance; ``max_per_pass=0`` turns it off).
    """

    broker: str | BrokerUrl
    repo: str | Path
    db_url: str
    replica_id: str = field(default_factory=default_replica_id)
    prefix: str = DEFAULT_PREFIX
    fleet: str = "+"
    shared_group: str | None = DEFAULT_SHARED_GROUP
    protocol: str = "auto"
    tick_s: float = 1.0
    batch_max: int = 500
    batch_wait_s: float = 0.2
    queue_max: int = 50_000
    actions_per_tick: int = 500
    late_joiner_check_s: float = 15.0
    desired_expires_s: float = 7 * 86400.0
    desired_renew_s: float = 2 * 86400.0
    refresh_check_s: float = 60.0
    refresh_fraction: float = 0.5
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    metrics_window_s: float = 60.0
    telemetry_retention_s: float = 7 * 86400.0
    block_rate_bytes_per_s: float = 8 * 1024 * 1024
    block_burst_bytes: float = 4 * 1024 * 1024
    block_qos: int = 1
    report_reread: ReportRereadPolicy = field(default_factory=ReportRereadPolicy)

    def __post_init__(self) -> None:
        if self.tick_s <= 0 or self.batch_wait_s < 0 or self.batch_max < 1 or self.queue_max < 1:
            raise BadInputError("tick_s must be positive, batch_max and queue_max at least 1")
        if not 0 < self.tick_s <= 3600:  # NaN would make every wait return at once; inf overflows the waits
            raise BadInputError(f"--tick {self.tick_s:g}: use a number of seconds within (0, 3600]")
        if self.shared_group is not None:
            # "$share/GROUP/FILTER": a '/' in the group would shift the filter onto other topics
            validate_identifier(self.shared_group, "--shared-group")
        if not self.replica_id or len(self.replica_id) > 100:
            raise BadInputError("the replica id must be 1-100 characters")
        if self.desired_renew_s >= self.desired_expires_s:
            raise BadInputError("desired states must be renewed before they expire (renew < expires)")
