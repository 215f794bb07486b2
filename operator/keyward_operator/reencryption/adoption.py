"""Has every kube-apiserver adopted a key_id? Answered from the apiservers' own metrics and identity Leases.

A rewrite sent to an apiserver that still encrypts with the old key_id stores the old key again, silently.
So a re-encryption waits until every apiserver reports the target key_id from its plugin's Status: the
gauge ``apiserver_envelope_encryption_key_id_hash_status_last_timestamp_seconds`` carries
``key_id_hash="sha256:<hex sha256 of key_id>"`` and ``apiserver_id_hash="sha256:<hex sha256 of the
apiserver's ID>"``; the apiserver switches its DEK to the new key_id right after recording it. Which
apiservers exist is told by their identity Leases in kube-system (label
``apiserver.kubernetes.io/identity=kube-apiserver``), each named by the apiserver's ID.

Metrics are per process: each apiserver endpoint of the ``kubernetes`` Service is scraped, plus the address
the operator talks to (behind a load balancer, or where the endpoints are not published). Each must also
pass ``/readyz/kms-providers``: an apiserver whose switch to the new DEK failed reports the new key_id in
the metric but keeps encrypting with the old one, and says so only there.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from keyward_operator import kubehttp

STATUS_METRIC = "apiserver_envelope_encryption_key_id_hash_status_last_timestamp_seconds"
IDENTITY_SELECTOR = "apiserver.kubernetes.io/identity=kube-apiserver"
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def sha256_label(value: str) -> str:
    return "sha256:" + hashlib.sha256(value.encode()).hexdigest()


def reported_key_ids(metrics_text: str) -> dict[str, set[str]]:
    """apiserver_id_hash -> the key_id hashes its plugin's Status has reported (Prometheus text format)."""
    out: dict[str, set[str]] = {}
    for line in metrics_text.splitlines():
        if not line.startswith(STATUS_METRIC + "{"):
            continue
        labels = dict(_LABEL.findall(line[len(STATUS_METRIC) + 1 : line.rfind("}")]))
        if "apiserver_id_hash" in labels and "key_id_hash" in labels:
            out.setdefault(labels["apiserver_id_hash"], set()).add(labels["key_id_hash"])
    return out


def live_apiservers(leases: Iterable[Mapping[str, Any]], now: datetime.datetime) -> list[str]:
    """The IDs (Lease names) of apiservers whose identity Lease has not expired."""
    ids = []
    for lease in leases:
        spec = lease.get("spec") or {}
        renewed = spec.get("renewTime")
        duration = spec.get("leaseDurationSeconds")
        name = (lease.get("metadata") or {}).get("name")
        if not name:
            continue
        if renewed and duration:
            at = datetime.datetime.fromisoformat(str(renewed).replace("Z", "+00:00"))
            if at + datetime.timedelta(seconds=int(duration)) < now:
                continue
        ids.append(str(name))
    return sorted(ids)


@dataclasses.dataclass(frozen=True)
class Adoption:
    adopted: bool
    apiservers: int  # how many apiservers the identity Leases name
    reporting: int  # how many of them report the key_id
    message: str


def judge(
    key_id: str, apiserver_ids: list[str], reported: Mapping[str, set[str]], unreachable: list[str]
) -> Adoption:
    wanted = sha256_label(key_id)
    if not apiserver_ids:
        # No identity Leases (APIServerIdentity off): every apiserver we could scrape must agree.
        if reported and all(wanted in keys for keys in reported.values()) and not unreachable:
            return Adoption(
                True, len(reported), len(reported), f"{key_id} is reported by every apiserver scraped"
            )
        return Adoption(
            False,
            len(reported),
            sum(wanted in keys for keys in reported.values()),
            f"no apiserver identity Lease in kube-system and no agreement yet on {key_id}",
        )
    missing = [a for a in apiserver_ids if wanted not in reported.get(sha256_label(a), set())]
    count = len(apiserver_ids)
    if not missing:
        return Adoption(True, count, count, f"all {count} apiserver(s) encrypt with {key_id}")
    text = (
        f"{count - len(missing)} of {count} apiserver(s) report {key_id} "
        f"(waiting for {', '.join(missing[:3])}{' and more' if len(missing) > 3 else ''}); "
        "apiservers poll their plugin's Status about once a minute"
    )
    if unreachable:
        text += f"; could not read /metrics from {', '.join(unreachable[:3])}"
    return Adoption(False, count, count - len(missing), text)


# (apiserver IDs, what each reports, endpoints that could not be read), or why nothing could be gathered.
_Gathered = tuple[list[str], dict[str, set[str]], list[str]] | Adoption


class AdoptionProbe:
    """Gathers the Leases and each apiserver's metrics, then ``judge`` decides.

    An apiserver's /metrics is large: what was gathered is reused for ``max_age`` seconds by every key
    that asks, so many keys waiting at once cost one scrape per apiserver, not one each.
    """

    def __init__(
        self, http: kubehttp.KubeHttp, *, clock: Callable[[], datetime.datetime], max_age: float = 4.0
    ) -> None:
        self.http = http
        self.clock = clock
        self.max_age = datetime.timedelta(seconds=max_age)
        self._lock = threading.Lock()
        self._cached: tuple[datetime.datetime, _Gathered] | None = None

    def check(self, key_id: str) -> Adoption:
        with self._lock:
            now = self.clock()
            if self._cached is None or now - self._cached[0] > self.max_age:
                self._cached = (now, self._gather())
            gathered = self._cached[1]
        if isinstance(gathered, Adoption):
            return gathered
        return judge(key_id, *gathered)

    def _gather(self) -> _Gathered:
        leases = self.http.request(
            "GET",
            "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases",
            query={"labelSelector": IDENTITY_SELECTOR},
        )
        if leases.status != 200:
            return Adoption(
                False, 0, 0, f"cannot list apiserver identity Leases in kube-system: {leases.message()}"
            )
        ids = live_apiservers(leases.json().get("items") or [], self.clock())
        reported: dict[str, set[str]] = {}
        unreachable: list[str] = []
        for host in [None, *self._endpoints()]:
            try:
                r = self.http.request("GET", "/metrics", host=host, accept="text/plain", timeout=10.0)
            except kubehttp.TransportError:
                unreachable.append(host or self.http.host)
                continue
            if r.status != 200:
                unreachable.append(f"{host or self.http.host} (HTTP {r.status})")
                continue
            for apiserver, keys in reported_key_ids(r.data.decode("utf-8", errors="replace")).items():
                reported.setdefault(apiserver, set()).update(keys)
            # The apiserver records a new key_id, then switches its DEK to it; if that switch fails it
            # keeps encrypting with the old key, and says so only here.
            ready = self.http.request(
                "GET", "/readyz/kms-providers", host=host, accept="text/plain", timeout=10.0
            )
            if ready.status != 200:
                where = host or self.http.host
                why = ready.data.decode("utf-8", errors="replace").strip().splitlines()
                unhealthy = next((line for line in why if line.startswith("[-]")), f"HTTP {ready.status}")
                return Adoption(
                    False, len(ids), 0, f"the apiserver at {where} is not ready: {unhealthy[:300]}"
                )
        return ids, reported, unreachable

    def _endpoints(self) -> list[str]:
        """https://ip:port of every ready endpoint of the default/kubernetes Service."""
        r = self.http.request(
            "GET",
            "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices",
            query={"labelSelector": "kubernetes.io/service-name=kubernetes"},
        )
        if r.status != 200:
            return []
        hosts = []
        for eps in r.json().get("items") or []:
            ports = [p.get("port") for p in eps.get("ports") or [] if p.get("name") == "https"] or [443]
            for ep in eps.get("endpoints") or []:
                if (ep.get("conditions") or {}).get("ready") is False:
                    continue
                for address in ep.get("addresses") or []:
                    host = f"[{address}]" if ":" in address else address
                    hosts.append(f"https://{host}:{ports[0]}")
        return sorted(set(hosts))
