"""The operator's /healthz: what the pod's probes see."""

from __future__ import annotations

import http.client
import time

from kubernetes import client

from keyward_operator import health, leadership


def get(port: int, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def test_healthz_answers_what_the_check_says_and_nothing_else_is_served():
    state = {"healthy": True}

    def check() -> tuple[bool, str]:
        return (True, "ok") if state["healthy"] else (False, "the leader-election loop has not run for 40s")

    server = health.HealthServer(0, check, host="127.0.0.1")
    server.start()
    try:
        assert get(server.port, "/healthz") == (200, "ok\n")
        state["healthy"] = False
        assert get(server.port, "/healthz") == (503, "the leader-election loop has not run for 40s\n")
        status, body = get(server.port, "/metrics")
        assert status == 404 and "only /healthz" in body
    finally:
        server.stop()


def test_the_election_loop_is_unhealthy_once_it_stops_making_attempts():
    elector = leadership.LeaderElector(
        client.CoordinationV1Api(), namespace="ns", identity="me", lease_seconds=1, renew_every=0.1
    )
    assert elector.healthy() == (True, "ok")
    time.sleep(1.3)  # no attempt for longer than the lease plus two renewals
    healthy, reason = elector.healthy()
    assert not healthy and "has not run for" in reason
