"""Reading etcd directly, as an admin on a control-plane node would: no apiserver, no etcdctl.

A read-only client for etcd's v3 JSON gateway (``POST /v3/kv/range``) over HTTPS with a client
certificate, using only the standard library. ``keyward audit`` uses it to count what kube-apiserver stored;
hack/localcluster.py uses it to show and test the same bytes.

Large ranges are read in pages (``limit`` keys per request, each page continuing after the last key), all
at one fixed revision, so a scan is a consistent snapshot and memory stays flat however many objects there
are. With several endpoints, a request goes to the first that answers; since revisions are the same on
every member, a scan may continue on another member.

Every failure is an :class:`EtcdError` whose message is one line saying what failed and what to check.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import http.client
import json
import os
import socket
import ssl
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

DEFAULT_PORT = 2379
DEFAULT_PAGE_SIZE = 100
DEFAULT_TIMEOUT = 10.0

#: The settings ``from_env`` reads; ``python hack/localcluster.py env`` exports them.
ENV_ENDPOINTS = "KEYWARD_ETCD_ENDPOINTS"
ENV_CACERT = "KEYWARD_ETCD_CACERT"
ENV_CERT = "KEYWARD_ETCD_CERT"
ENV_KEY = "KEYWARD_ETCD_KEY"


class EtcdError(Exception):
    """etcd could not be read. The message is one line: what failed and what to check."""


class EtcdConfigError(EtcdError):
    """A setting cannot be used. ``setting`` names it: ``endpoints``, ``cacert``, ``cert``, ``key``, or
    ``cert+key`` when the certificate and key do not go together."""

    def __init__(self, message: str, setting: str) -> None:
        super().__init__(message)
        self.setting = setting


@dataclasses.dataclass(frozen=True)
class KeyValue:
    key: bytes
    value: bytes  # empty for keys-only reads
    mod_revision: int


@dataclasses.dataclass(frozen=True)
class Page:
    """One range response: up to ``limit`` keys, whether more follow, and the revision it was read at."""

    kvs: tuple[KeyValue, ...]
    more: bool
    count: int  # keys in the whole requested range, not only this page
    revision: int


@dataclasses.dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"


def parse_endpoint(text: str) -> Endpoint:
    """``https://HOST[:PORT]`` (port 2379 if absent); anything else is an EtcdConfigError."""
    hint = "expected https://HOST:PORT, e.g. https://127.0.0.1:2379"
    try:
        url = urllib.parse.urlsplit(text.strip())
        port = url.port
    except ValueError:
        raise EtcdConfigError(f"etcd endpoint {text!r} is not a URL; {hint}", "endpoints") from None
    if url.scheme != "https":
        raise EtcdConfigError(
            f"etcd endpoint {text!r} is not https: etcd serves clients over TLS here; {hint}", "endpoints"
        )
    if not url.hostname or url.path not in ("", "/") or url.query or url.fragment or url.username:
        raise EtcdConfigError(f"etcd endpoint {text!r} is not https://HOST:PORT; {hint}", "endpoints")
    return Endpoint(url.hostname, port or DEFAULT_PORT)


def parse_endpoints(text: str | Sequence[str]) -> tuple[Endpoint, ...]:
    """A comma-separated list (or a sequence) of endpoints, at least one."""
    items = text.split(",") if isinstance(text, str) else list(text)
    found = tuple(parse_endpoint(item) for item in items if item.strip())
    if not found:
        raise EtcdConfigError("no etcd endpoint given", "endpoints")
    return found


def prefix_end(prefix: bytes) -> bytes:
    """The ``range_end`` that selects every key starting with ``prefix``."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"  # an empty prefix, or only 0xff bytes: every key from ``prefix`` on


def tls_context(ca: Path, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    """A client context trusting ``ca`` and presenting ``cert``/``key`` (both or neither)."""
    if (cert is None) != (key is None):
        missing, setting = ("certificate", "cert") if cert is None else ("key", "key")
        raise EtcdConfigError(
            f"the etcd client certificate and key go together: the {missing} is missing", setting
        )
    for role, path, setting in (
        ("CA certificate", ca, "cacert"),
        ("client certificate", cert, "cert"),
        ("client key", key, "key"),
    ):
        if path is None:
            continue
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            raise EtcdConfigError(
                f"cannot read the etcd {role} file {path}: {exc.strerror or exc}", setting
            ) from None
    try:
        ctx = ssl.create_default_context(cafile=str(ca))
    except ssl.SSLError as exc:
        raise EtcdConfigError(
            f"the etcd CA file {ca} holds no usable PEM certificate ({exc.reason or exc})", "cacert"
        ) from None
    if cert is not None and key is not None:
        try:
            ctx.load_cert_chain(str(cert), str(key))
        except ssl.SSLError as exc:
            raise EtcdConfigError(
                f"the etcd client certificate {cert} and key {key} do not load ({exc.reason or exc}): "
                "both must be PEM and the key must belong to the certificate",
                "cert+key",
            ) from None
    return ctx


class _Unreachable(Exception):
    """This endpoint did not answer over TLS; another one may."""


class EtcdClient:
    """Read-only access to etcd through its JSON gateway: :meth:`scan` for large ranges, :meth:`get`.

    ``endpoints`` is one URL, a comma-separated list, or a sequence; requests go to the first that
    answers. ``cert`` and ``key`` are the client certificate etcd asks for (``--client-cert-auth``).
    Files are read on the first request.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str],
        ca: Path | str,
        cert: Path | str | None = None,
        key: Path | str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.endpoints = parse_endpoints(endpoints)
        self.ca = Path(ca)
        self.cert = None if cert is None else Path(cert)
        self.key = None if key is None else Path(key)
        self.timeout = timeout
        self._active = self.endpoints[0]
        self._ctx: ssl.SSLContext | None = None

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, *, timeout: float = DEFAULT_TIMEOUT
    ) -> EtcdClient:
        """From KEYWARD_ETCD_ENDPOINTS, _CACERT, _CERT and _KEY (what ``localcluster.py env`` exports)."""
        env = os.environ if env is None else env
        settings: dict[str, str] = {}
        for name, setting in ((ENV_ENDPOINTS, "endpoints"), (ENV_CACERT, "cacert")):
            settings[setting] = env.get(name, "")
            if not settings[setting]:
                raise EtcdConfigError(f"{name} is not set", setting)
        return cls(
            settings["endpoints"],
            settings["cacert"],
            env.get(ENV_CERT) or None,
            env.get(ENV_KEY) or None,
            timeout=timeout,
        )

    @property
    def endpoint(self) -> str:
        """The URL of the endpoint that answered last (the first one before any request)."""
        return self._active.url

    # -- reads -------------------------------------------------------------------------------------

    def healthy(self, timeout: float = 2.0) -> bool:
        """True if ``GET /health`` says so."""
        status, body = self._call("GET", "/health", None, timeout)
        try:
            return status == 200 and json.loads(body).get("health") == "true"
        except (ValueError, AttributeError):
            return False

    def range(
        self,
        key: bytes,
        range_end: bytes | None = None,
        *,
        limit: int = 0,
        revision: int = 0,
        keys_only: bool = False,
        count_only: bool = False,
    ) -> Page:
        """One range request: ``key`` alone, or ``[key, range_end)``; revision 0 means the latest."""
        request: dict[str, Any] = {"key": _b64(key)}
        if range_end is not None:
            request["range_end"] = _b64(range_end)
        if limit:
            request["limit"] = limit
        if revision:
            request["revision"] = revision
        if keys_only:
            request["keys_only"] = True
        if count_only:
            request["count_only"] = True
        reply = self._post("/v3/kv/range", request)
        try:
            kvs = tuple(
                KeyValue(
                    base64.b64decode(kv["key"]),
                    base64.b64decode(kv.get("value", "")),
                    int(kv.get("mod_revision", 0)),
                )
                for kv in reply.get("kvs", [])
            )
            return Page(
                kvs,
                bool(reply.get("more", False)),
                int(reply.get("count", 0)),
                int(reply["header"]["revision"]),
            )
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise EtcdError(
                f"etcd at {self.endpoint} sent a range reply Keyward cannot read ({type(exc).__name__}); "
                "is this etcd 3.4 or newer?"
            ) from None

    def current_revision(self, key: bytes) -> int:
        """The store's revision now (read with a count-only request on ``key``)."""
        return self.range(key, count_only=True).revision

    def scan(
        self,
        prefix: bytes,
        *,
        revision: int = 0,
        page_size: int = DEFAULT_PAGE_SIZE,
        keys_only: bool = False,
    ) -> Iterator[KeyValue]:
        """Every key starting with ``prefix``, in key order, read ``page_size`` keys at a time.

        All pages are read at ``revision`` (or at the revision of the first page when 0), so keys
        written or deleted during the scan do not change what it yields.
        """
        if page_size < 1:
            raise ValueError("page_size must be at least 1")
        start, end = prefix, prefix_end(prefix)
        while True:
            page = self.range(start, end, limit=page_size, revision=revision, keys_only=keys_only)
            revision = revision or page.revision
            yield from page.kvs
            if not page.more or not page.kvs:
                return
            start = page.kvs[-1].key + b"\0"

    def get(self, key: str) -> bytes | None:
        """The raw stored value of ``key`` (as the apiserver wrote it), or None."""
        page = self.range(key.encode())
        return page.kvs[0].value if page.kvs else None

    def keys(self, prefix: str) -> list[str]:
        """Every key starting with ``prefix``, sorted. For small ranges: the list is kept in memory."""
        return [kv.key.decode() for kv in self.scan(prefix.encode(), keys_only=True)]

    def items(self, prefix: str) -> dict[str, bytes]:
        """Every key starting with ``prefix`` with its raw value. For small ranges, like :meth:`keys`."""
        return {kv.key.decode(): kv.value for kv in self.scan(prefix.encode())}

    # -- transport ---------------------------------------------------------------------------------

    def _tls(self) -> ssl.SSLContext:
        if self._ctx is None:
            self._ctx = tls_context(self.ca, self.cert, self.key)
        return self._ctx

    def _post(self, path: str, request: Mapping[str, Any]) -> dict[str, Any]:
        status, body = self._call("POST", path, json.dumps(request).encode(), self.timeout)
        message = ""
        try:
            reply = json.loads(body)
        except ValueError:
            reply = None
        if isinstance(reply, dict):
            message = str(reply.get("message") or reply.get("error") or "")
        if status == 200 and isinstance(reply, dict):
            return reply
        where = f"etcd at {self.endpoint}"
        if "compacted" in message:
            raise EtcdError(
                f"{where}: the revision being read was compacted meanwhile ({message}); run again "
                "(kube-apiserver compacts every 5 minutes by default)"
            )
        if "permission denied" in message or "user name" in message:
            raise EtcdError(
                f"{where} refused the read ({message}): the client certificate's user needs read access"
            )
        if status == 404:
            raise EtcdError(
                f"{where} has no {path} (HTTP 404): is it etcd 3.4 or newer, with its gateway on?"
            )
        if status == 200:
            raise EtcdError(f"{where} answered {path} with something that is not JSON: is it etcd?")
        shown = message or body[:200].decode(errors="replace").strip() or "no message"
        raise EtcdError(f"{where} answered {path} with HTTP {status}: {shown}")

    def _call(self, method: str, path: str, body: bytes | None, timeout: float) -> tuple[int, bytes]:
        """One request to the active endpoint, else to the others in order; (status, body)."""
        ctx = self._tls()
        order = [self._active, *(e for e in self.endpoints if e != self._active)]
        failures: list[str] = []
        for endpoint in order:
            try:
                result = _request(ctx, endpoint, method, path, body, timeout=timeout, ca=self.ca)
            except _Unreachable as exc:
                failures.append(str(exc))
                continue
            self._active = endpoint
            return result
        if len(failures) == 1:
            raise EtcdError(failures[0])
        raise EtcdError("no etcd endpoint answered: " + "; ".join(failures))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _request(
    ctx: ssl.SSLContext,
    endpoint: Endpoint,
    method: str,
    path: str,
    body: bytes | None,
    *,
    timeout: float,
    ca: Path,
) -> tuple[int, bytes]:
    """One HTTPS request; connection and TLS failures become _Unreachable with a one-line reason."""
    url = endpoint.url
    conn = http.client.HTTPSConnection(endpoint.host, endpoint.port, context=ctx, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    except ssl.SSLCertVerificationError as exc:
        raise _Unreachable(
            f"the certificate of etcd at {url} does not verify against the CA file {ca} "
            f"({exc.verify_message or exc.reason}): check the CA file and the endpoint's host name"
        ) from None
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if reason == "WRONG_VERSION_NUMBER":
            raise _Unreachable(f"{url} does not speak TLS: is it etcd's client port?") from None
        raise _Unreachable(
            f"TLS with etcd at {url} failed ({reason}): check that etcd trusts the client certificate and key"
        ) from None
    except ConnectionRefusedError:
        raise _Unreachable(f"nothing listens at {url} (connection refused): check the endpoint") from None
    except socket.gaierror as exc:
        raise _Unreachable(f"cannot resolve the host of {url} ({exc.strerror})") from None
    except TimeoutError:
        raise _Unreachable(f"etcd at {url} did not answer within {timeout:g}s") from None
    except OSError as exc:
        raise _Unreachable(f"cannot reach etcd at {url}: {exc.strerror or exc}") from None
    except http.client.HTTPException as exc:
        raise _Unreachable(f"{url} did not answer like etcd ({type(exc).__name__})") from None
    finally:
        conn.close()
