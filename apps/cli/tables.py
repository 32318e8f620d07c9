"""Human-readable output of the operator verbs (`job list/show`, `client list`, `token list`); `--json` keeps
the API's JSON."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from apps.demo.report import format_table


def when(value: str | None) -> str:
    """An API timestamp to the minute (`2026-12-01 11:02`); `-` for none."""
    if not value:
        return "-"
    try:
        return datetime.fromisoformat(value).strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return value


def _table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(line.rstrip() for line in format_table([header, *rows]).splitlines())


def _page_footer(page: dict[str, Any], noun: str) -> str:
    shown, total, offset = len(page["items"]), page["total"], page["offset"]
    if shown == total:
        return f"{total} {noun}"
    return f"{shown} of {total} {noun} (from {offset + 1}; --offset/--limit for others)"


def jobs_table(page: dict[str, Any]) -> str:
    if not page["items"]:
        return f"no jobs (total {page['total']})"
    rows = [
        [
            str(job["id"]),
            job["name"],
            job["status"],
            f"{job['current_round']}/{job['rounds']}",
            job["task_type"],
            job["model_ref"],
            job["parallel_mode"],
            str(job["min_clients"]),
            when(job["created_at"]),
        ]
        for job in page["items"]
    ]
    header = ["ID", "NAME", "STATUS", "ROUND", "TASK", "MODEL", "MODE", "MIN_CLIENTS", "CREATED"]
    return _table(header, rows) + "\n" + _page_footer(page, "jobs")


def job_detail(job: dict[str, Any]) -> str:
    """A job's settings, what it waits for or why it failed, its participants and its rounds."""
    lines = [
        f"job {job['id']} {job['name']!r}: {job['status']}, round {job['current_round']}/{job['rounds']}",
        f"  model {job['model_ref']}, task {job['task_type']}, {job['parallel_mode']}"
        + (f" x {job['replicas']} replicas" if job.get("replicas", 1) != 1 else "")
        + f", {job['rounds']} rounds x {job['steps_per_round']} steps",
        f"  min_clients {job['min_clients']}, round timeout {job['round_timeout_s']:g} s, "
        f"straggler policy {job['straggler_policy']}"
        + (f", start {job['start']}" if job.get("start") else ""),
        f"  created {when(job['created_at'])} by {job['created_by']}, updated {when(job['updated_at'])}",
    ]
    if job.get("waiting_for"):
        lines.append(f"  waiting for: {job['waiting_for']}")
    if job.get("failure_reason"):
        lines.append(f"  failure: {job['failure_reason']}")
    for client, error in sorted((job.get("client_failures") or {}).items()):
        lines.append(f"  {client} failed: {error}")
    settings = {
        "hyperparameters": job["hyperparameters"],
        "adapter": job["adapter"],
        "privacy": job["privacy"],
    }
    for section, values in settings.items():
        if values:
            lines.append(f"  {section}: " + ", ".join(f"{k}={v}" for k, v in sorted(values.items())))
    participants = job.get("participants") or []
    lines += ["", "participants"]
    if participants:
        rows = [
            [str(p["client_id"]), p["client_name"], p["client_status"], p["consent"], when(p["decided_at"])]
            for p in participants
        ]
        lines.append(_table(["ID", "CLIENT", "STATUS", "CONSENT", "DECIDED"], rows))
    else:
        lines.append("none invited")
    rounds = job.get("round_history") or []
    lines += ["", "rounds"]
    if rounds:
        names = {p["client_id"]: p["client_name"] for p in participants}
        rows = []
        for item in rounds:
            states = [
                f"{names.get(p['client_id'], p['client_id'])} {p['status']}"
                + (f" ({p['drop_reason']})" if p.get("drop_reason") else "")
                for p in item["participants"]
            ]
            rows.append(
                [
                    str(item["number"]),
                    item["status"],
                    when(item["started_at"]),
                    when(item["closed_at"]),
                    item.get("close_reason") or "-",
                    ", ".join(states) or "-",
                ]
            )
        lines.append(_table(["ROUND", "STATUS", "STARTED", "CLOSED", "REASON", "CLIENTS"], rows))
    else:
        lines.append("none yet")
    return "\n".join(lines)


def clients_table(page: dict[str, Any]) -> str:
    if not page["items"]:
        return f"no clients (total {page['total']})"
    rows = [
        [
            str(client["id"]),
            client["name"],
            client["status"],
            str(client["example_count"]) if client["example_count"] else "-",
            when(client["last_heartbeat_at"]),
            when(client["enrolled_at"]),
        ]
        for client in page["items"]
    ]
    header = ["ID", "NAME", "STATUS", "EXAMPLES", "LAST_HEARTBEAT", "ENROLLED"]
    return _table(header, rows) + "\n" + _page_footer(page, "clients")


def tokens_table(page: dict[str, Any]) -> str:
    if not page["items"]:
        return f"no tokens (total {page['total']})"
    rows = [
        [
            str(token["id"]),
            token["name"],
            token["role"],
            when(token["created_at"]),
            when(token["last_used_at"]),
            when(token["revoked_at"]) if token["revoked_at"] else "active",
        ]
        for token in page["items"]
    ]
    header = ["ID", "NAME", "ROLE", "CREATED", "LAST_USED", "REVOKED"]
    return _table(header, rows) + "\n" + _page_footer(page, "tokens")
