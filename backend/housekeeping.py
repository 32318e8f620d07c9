"""Periodic control-plane duties: heartbeat leases and round deadlines, in one transaction per pass."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.orm import Session, sessionmaker

from backend.clients.service import mark_silent_clients_offline
from backend.jobs.service import enforce_round_deadlines


@dataclass(frozen=True)
class HousekeepingReport:
    clients_marked_offline: list[int]
    rounds_closed_by_deadline: list[tuple[int, int]]


def run_housekeeping(
    session_factory: sessionmaker[Session], now: datetime, lease_s: float
) -> HousekeepingReport:
    with session_factory() as session, session.begin():
        offline = mark_silent_clients_offline(session, now, lease_s)
        overdue = enforce_round_deadlines(session, now)
    return HousekeepingReport(clients_marked_offline=offline, rounds_closed_by_deadline=overdue)
