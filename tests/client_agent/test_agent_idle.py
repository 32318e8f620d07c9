"""An agent with nothing to do waits on the server for work (a long-poll) instead of asking every --poll-s."""

from __future__ import annotations

import time
from pathlib import Path

from tests.support.agent_processes import make_agent, wait_until
from tests.support.capture_proxy import CaptureProxy
from tests.support.control_plane import Api, LiveServer


def test_an_idle_agent_long_polls_its_work(tmp_path: Path, live_server: LiveServer, api: Api) -> None:
    proxy = CaptureProxy(live_server.base_url, live_server.tls.ca_cert)
    agent = make_agent(tmp_path, api, live_server, "idle-owner", 0, proxy.url)

    def work_requests() -> list[bytes]:
        return [r for r in list(proxy.requests) if r.startswith(b"GET /api/v1/agent/work")]

    run = agent.start_run()  # --poll-s 0.3: without the long-poll, ~25 work requests in 8 s
    try:
        wait_until(lambda: bool(work_requests()), 120, "the agent's first work request")
        time.sleep(8)
        assert run.poll() is None, agent.log.read_text()[-2000:]
        work = work_requests()
    finally:
        run.terminate()
        run.wait(timeout=30)
        proxy.close()
    assert len(work) <= 2, [r.split(b"\r\n", 1)[0] for r in work]
    assert b"wait_s=25.000" in work[0]
