"""A real local Kubernetes control plane for Keyward, run as plain processes.

This module starts etcd and kube-apiserver (built by hack/build-binaries.sh), a SoftHSM2 token and the
Keyward KMS plugin on this machine, the way controller-runtime's envtest does: no kubelet, no
scheduler, no containers. Everything listens on 127.0.0.1 only.

It has two users:

* pytest fixtures import it (``import localcluster``; pytest puts ``hack`` on ``sys.path``) and drive
  the pieces one by one: :class:`Pki`, :class:`SoftHsmToken`, :class:`Etcd`, :class:`KubeApiserver`,
  :func:`write_encryption_config` and :class:`Plugin`.
* the Makefile runs it as a command: ``python hack/localcluster.py up|down|env|status --state DIR``.
  ``up`` leaves the processes running after it exits and records their pids in DIR; ``down`` stops
  them and removes DIR; ``env`` prints ``export`` lines for ``eval "$(make -s env)"``.

Every process logs to a file in its own directory (``etcd.log``, ``kube-apiserver.log``,
``plugin.log``) and every component class has ``log_tail(n)`` so a failing test can show why.
Besides the standard library it uses ``cryptography`` (the PKI) and Keyward's own etcd client
(:mod:`keyward.etcd`, which ``keyward audit`` uses too).
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import datetime
import glob
import http.client
import ipaddress
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import ClassVar, NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keyward.etcd import EtcdClient, EtcdError

REPO_ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
ADMIN_USER = "keyward-admin"
ADMIN_GROUP = "system:masters"
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
# Unix socket paths are limited to 108 bytes (sun_path); keep a margin.
MAX_SOCKET_PATH = 100
STOP_GRACE_SECONDS = 10.0


class ComponentError(RuntimeError):
    """A component failed to start or to become ready; carries the tail of its log."""

    def __init__(self, component: str, message: str, log_tail: str = "") -> None:
        super().__init__(f"{component}: {message}")
        self.component = component
        self.message = message
        self.log_tail = log_tail

    def report(self) -> str:
        """The failure as text for a human: what failed, why, and the end of its log."""
        text = f"{self.component} failed: {self.message}"
        if self.log_tail:
            text += f"\n--- last lines of the {self.component} log ---\n{self.log_tail.rstrip()}"
        return text


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


def keyward_bin_dir() -> Path:
    """The directory holding kube-apiserver, kubectl, etcd and helm.

    ``$KEYWARD_BIN`` when set, else what hack/versions.sh computes (so both always agree).
    """
    from_env = os.environ.get("KEYWARD_BIN")
    if from_env:
        return Path(from_env)
    out = subprocess.run(
        ["bash", "-c", "source hack/versions.sh; echo $KEYWARD_BIN"],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    if not out:
        raise RuntimeError("hack/versions.sh did not define KEYWARD_BIN")
    return Path(out)


def venv_bin_dir() -> Path:
    """The bin directory of the running Python (the project's .venv when run through the Makefile)."""
    return Path(sys.executable).parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret file with mode 0600 from the start (never readable by others, even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600)


def _tail(path: Path, lines: int) -> str:
    """The last ``lines`` lines of a text file ('' if it does not exist)."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 256 * 1024))
            data = handle.read()
    except FileNotFoundError:
        return ""
    text = data.decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def _client_ssl_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def _https_request(
    ctx: ssl.SSLContext,
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    *,
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, bytes]:
    """One HTTPS request to 127.0.0.1:port; returns (status, body)."""
    conn = http.client.HTTPSConnection(LOOPBACK, port, context=ctx, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _pid_cmdline(pid: int) -> list[str] | None:
    """The argv of a live (non-zombie) process, or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        # The state letter follows the ')' that closes the command name.
        if stat[stat.rindex(")") + 2] in "ZX":
            return None
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, ValueError, IndexError, PermissionError):
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def pid_matches(pid: int, name: str) -> bool:
    """True if ``pid`` is alive and runs ``name`` (argv[0], or a script argument for Python scripts).

    Checking the command line guards against signalling an unrelated process that reused a recorded pid.
    """
    argv = _pid_cmdline(pid)
    if not argv:
        return False
    return any(Path(arg).name == name for arg in argv[:2])


def terminate_pid(pid: int, name: str, grace: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM the process group led by ``pid`` (if it still runs ``name``), SIGKILL after ``grace``."""
    if not pid_matches(pid, name):
        return
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not pid_matches(pid, name):
            return
        time.sleep(0.05)
    _signal_group(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and pid_matches(pid, name):
        time.sleep(0.05)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal the process group of ``pid`` (our processes lead their own session), else the pid."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


# --------------------------------------------------------------------------------------------------
# PKI
# --------------------------------------------------------------------------------------------------


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attrs)


def _key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """EC keys sign: leaves for TLS, the CA also for certificates and CRLs."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


class _Leaf(NamedTuple):
    """One leaf certificate of :class:`Pki`."""

    stem: str  # file names: <stem>.crt and <stem>.key
    cn: str
    org: str | None
    dns: tuple[str, ...]
    ips: tuple[str, ...]
    usages: tuple[x509.ObjectIdentifier, ...]


class Pki:
    """Certificates and keys for one local control plane, in ``dir``.

    One CA signs everything. Files (all PEM; keys mode 0600):

    * ``ca.crt``/``ca.key``: the CA, trusted by etcd, by the apiserver for client certs, and by clients.
    * ``etcd-server.crt``/``.key``: etcd's serving cert (127.0.0.1, localhost).
    * ``etcd-client.crt``/``.key``: the apiserver's client cert for etcd.
    * ``admin.crt``/``.key``: user ``keyward-admin`` in group ``system:masters`` (kubectl, tests; etcd
      accepts it too since etcd trusts any cert the CA signed).
    * ``apiserver.crt``/``.key``: the apiserver's serving cert (127.0.0.1, localhost, 10.0.0.1,
      kubernetes.default.svc...).
    * ``sa.key``/``sa.pub``: the RSA key pair that signs and verifies service-account tokens.

    Idempotent: existing files are reused; if the CA has to be made, every leaf is made again.
    """

    VALIDITY: ClassVar[datetime.timedelta] = datetime.timedelta(days=365)

    def __init__(self, dir: Path) -> None:
        self.dir = Path(dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca_cert = self.dir / "ca.crt"
        self.ca_key = self.dir / "ca.key"
        self.etcd_server_cert = self.dir / "etcd-server.crt"
        self.etcd_server_key = self.dir / "etcd-server.key"
        self.etcd_client_cert = self.dir / "etcd-client.crt"
        self.etcd_client_key = self.dir / "etcd-client.key"
        self.admin_cert = self.dir / "admin.crt"
        self.admin_key = self.dir / "admin.key"
        self.apiserver_cert = self.dir / "apiserver.crt"
        self.apiserver_key = self.dir / "apiserver.key"
        self.sa_key = self.dir / "sa.key"
        self.sa_pub = self.dir / "sa.pub"
        self._ensure()

    def _leaves(self) -> list[_Leaf]:
        server = ExtendedKeyUsageOID.SERVER_AUTH
        client = ExtendedKeyUsageOID.CLIENT_AUTH
        apiserver_dns = (
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        )
        return [
            # etcd's gRPC gateway dials etcd itself with the server cert, so it needs client auth too.
            _Leaf("etcd-server", "etcd", None, ("localhost",), (LOOPBACK,), (server, client)),
            _Leaf("etcd-client", "kube-apiserver-etcd-client", None, (), (), (client,)),
            _Leaf("admin", ADMIN_USER, ADMIN_GROUP, (), (), (client,)),
            _Leaf("apiserver", "kube-apiserver", None, apiserver_dns, (LOOPBACK, "10.0.0.1"), (server,)),
        ]

    def _ensure(self) -> None:
        fresh_ca = not (self.ca_cert.exists() and self.ca_key.exists())
        if fresh_ca:
            ca_key = ec.generate_private_key(ec.SECP256R1())
            ca_name = _name("keyward-local-ca")
            ca_cert = (
                x509.CertificateBuilder()
                .subject_name(ca_name)
                .issuer_name(ca_name)
                .public_key(ca_key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(_now() - datetime.timedelta(minutes=5))
                .not_valid_after(_now() + self.VALIDITY * 10)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(_key_usage(ca=True), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
                .sign(ca_key, hashes.SHA256())
            )
            _write_private(self.ca_key, _key_pem(ca_key))
            self.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        else:
            loaded = serialization.load_pem_private_key(self.ca_key.read_bytes(), password=None)
            if not isinstance(loaded, ec.EllipticCurvePrivateKey):
                raise TypeError(f"{self.ca_key}: expected an EC private key")
            ca_key = loaded
            ca_cert = x509.load_pem_x509_certificate(self.ca_cert.read_bytes())

        for leaf in self._leaves():
            crt, key = self.dir / f"{leaf.stem}.crt", self.dir / f"{leaf.stem}.key"
            if fresh_ca or not (crt.exists() and key.exists()):
                self._issue(ca_cert, ca_key, leaf)

        if not (self.sa_key.exists() and self.sa_pub.exists()):
            sa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            _write_private(self.sa_key, _key_pem(sa))
            self.sa_pub.write_bytes(
                sa.public_key().public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            )

    def _issue(self, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, leaf: _Leaf) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(leaf.cn, leaf.org))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(minutes=5))
            .not_valid_after(_now() + self.VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(list(leaf.usages)), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
        )
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in leaf.dns]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in leaf.ips]
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        _write_private(self.dir / f"{leaf.stem}.key", _key_pem(key))
        (self.dir / f"{leaf.stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def admin_ssl_context(self) -> ssl.SSLContext:
        """A client TLS context trusting the CA and presenting the admin cert."""
        return _client_ssl_context(self.ca_cert, self.admin_cert, self.admin_key)


# --------------------------------------------------------------------------------------------------
# SoftHSM2 token
# --------------------------------------------------------------------------------------------------


def find_softhsm_module() -> Path:
    """The path of libsofthsm2.so: Debian's location, then the package's file list, then known dirs."""
    debian = Path("/usr/lib/softhsm/libsofthsm2.so")
    if debian.is_file():
        return debian
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        listing = subprocess.run(
            ["dpkg", "-L", "softhsm2"], check=True, capture_output=True, text=True
        ).stdout
        for line in listing.splitlines():
            if line.endswith("/libsofthsm2.so") and Path(line).is_file():
                return Path(line)
    # Non-recursive patterns only: a recursive glob over /usr/lib can take minutes.
    patterns = (
        "/usr/lib/*/softhsm/libsofthsm2.so",
        "/usr/lib*/softhsm/libsofthsm2.so",
        "/usr/lib*/libsofthsm2.so",
        "/usr/local/lib*/softhsm/libsofthsm2.so",
    )
    for pattern in patterns:
        for match in sorted(glob.glob(pattern)):
            if Path(match).is_file():
                return Path(match)
    raise FileNotFoundError("libsofthsm2.so not found: install the softhsm2 package")


class SoftHsmToken:
    """A SoftHSM2 token whose configuration and token files all live in ``dir``.

    Writes ``dir/softhsm2.conf`` (tokendir ``dir/tokens``), initialises a token labelled ``label`` in
    the first free slot unless one with that label is already there, and writes the user PIN to
    ``dir/pin`` (mode 0600). PINs default to random values; an existing ``pin`` file is reused.
    The PINs appear on a command line only for ``softhsm2-util --init-token``, which has no other way.
    """

    def __init__(
        self,
        dir: Path,
        label: str = "keyward",
        pin: str | None = None,
        so_pin: str | None = None,
    ) -> None:
        self.dir = Path(dir)
        self.label = label
        self.token_dir = self.dir / "tokens"
        self.conf_path = self.dir / "softhsm2.conf"
        self.pin_file = self.dir / "pin"
        self.so_pin_file = self.dir / "so-pin"
        self.module_path = find_softhsm_module()
        self.token_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        self.conf_path.write_text(
            "# Written by hack/localcluster.py\n"
            f"directories.tokendir = {self.token_dir}\n"
            "objectstore.backend = file\n"
            "log.level = ERROR\n"
            "slots.removable = false\n"
        )
        if pin is None:
            pin = self.pin_file.read_text().strip() if self.pin_file.exists() else secrets.token_hex(8)
        if so_pin is None:
            so_pin = (
                self.so_pin_file.read_text().strip() if self.so_pin_file.exists() else secrets.token_hex(8)
            )
        _write_private(self.pin_file, pin.encode())
        _write_private(self.so_pin_file, so_pin.encode())
        if not self.initialized():
            self._util(
                "--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", so_pin, secret=True
            )

    def env(self) -> dict[str, str]:
        """The environment the Keyward plugin and CLI read to find this token."""
        return {
            "SOFTHSM2_CONF": str(self.conf_path),
            "KEYWARD_PKCS11_MODULE": str(self.module_path),
            "KEYWARD_TOKEN_LABEL": self.label,
            "KEYWARD_PIN_FILE": str(self.pin_file),
        }

    def initialized(self) -> bool:
        """True if a token labelled ``label`` exists in this token directory."""
        out = self._util("--show-slots")
        return any(
            line.strip().startswith("Label:") and line.split(":", 1)[1].strip() == self.label
            for line in out.splitlines()
        )

    def _util(self, *args: str, secret: bool = False) -> str:
        env = {**os.environ, "SOFTHSM2_CONF": str(self.conf_path)}
        proc = subprocess.run(["softhsm2-util", *args], env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            shown = args[0] if secret else " ".join(args)  # never echo PINs
            raise ComponentError(
                "softhsm", f"softhsm2-util {shown} exited {proc.returncode}", proc.stdout + proc.stderr
            )
        return proc.stdout


# --------------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------------

_LIVE: weakref.WeakSet[ManagedProcess] = weakref.WeakSet()


@atexit.register
def _stop_attached() -> None:
    """Stop processes this interpreter started without ``detach`` (e.g. a pytest run that aborts)."""
    for proc in list(_LIVE):
        with contextlib.suppress(Exception):
            proc.stop(grace=3.0)


class ManagedProcess:
    """One long-running child process with a log file and a pid file in ``dir``.

    Children start in their own session (so a terminal's Ctrl-C reaches only the parent, and stop()
    can signal the whole group). With ``detach=False`` (the default, for pytest) they are also stopped
    when this interpreter exits; ``detach=True`` (the CLI's ``up``) leaves them running.
    """

    name: ClassVar[str] = "process"
    #: Basename of argv[0] (or argv[1] for a Python script), used to check a recorded pid is still ours.
    exe_name: ClassVar[str] = "process"

    def __init__(self, dir: Path) -> None:
        self.dir = Path(dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / f"{self.name}.log"
        self.pid_path = self.dir / f"{self.name}.pid"
        self._popen: subprocess.Popen[bytes] | None = None
        #: False: stopped when this interpreter exits. True: outlives it (set before start()).
        self.detach = False

    # -- to override -------------------------------------------------------------------------------
    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def wait_ready(self, timeout: float) -> None:
        """Block until the process serves; raise ComponentError on timeout or exit."""
        raise NotImplementedError

    # -- lifecycle ---------------------------------------------------------------------------------
    def spawn(self) -> None:
        """Start the process (not waiting for readiness)."""
        if self.running():
            raise ComponentError(self.name, f"already running (pid {self.pid})")
        argv = self.command()
        with self.log_path.open("ab") as log:
            header = f"\n=== {_now().isoformat()} starting: {shlex.join(argv)}\n"
            log.write(header.encode())
            log.flush()
            try:
                self._popen = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self.environment(),
                    cwd=self.dir,
                    start_new_session=True,
                )
            except OSError as exc:
                raise ComponentError(self.name, f"cannot execute {argv[0]}: {exc}") from exc
        self.pid_path.write_text(f"{self._popen.pid}\n")
        if not self.detach:
            _LIVE.add(self)

    def spawn_and_wait(self, timeout: float) -> None:
        """spawn(), then wait_ready(); a process that does not get ready is stopped again."""
        self.spawn()
        try:
            self.wait_ready(timeout)
        except ComponentError:
            self.stop()
            raise

    @property
    def pid(self) -> int | None:
        """The pid of the running process, or None."""
        if self._popen is not None:
            return self._popen.pid if self._popen.poll() is None else None
        return None

    def running(self) -> bool:
        return self.pid is not None

    def exited(self) -> int | None:
        """The exit code if the process has ended, else None."""
        return None if self._popen is None else self._popen.poll()

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds. Safe to call when not running."""
        self._end(signal.SIGTERM, grace)

    def kill(self) -> None:
        """SIGKILL right away: a simulated crash (leaves sockets and lock files behind)."""
        self._end(signal.SIGKILL, 0.0)

    def _end(self, sig: signal.Signals, grace: float) -> None:
        popen = self._popen
        _LIVE.discard(self)
        if popen is None:
            return
        if popen.poll() is None:
            _signal_group(popen.pid, sig)
            try:
                popen.wait(timeout=grace if grace > 0 else 5.0)
            except subprocess.TimeoutExpired:
                _signal_group(popen.pid, signal.SIGKILL)
                popen.wait(timeout=10.0)
        # Reap anything left in the group (the leader is gone; children would be orphans).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(popen.pid, signal.SIGKILL)
        with contextlib.suppress(FileNotFoundError):
            self.pid_path.unlink()

    def log_tail(self, n: int = 40) -> str:
        """The last ``n`` lines of this process's log."""
        return _tail(self.log_path, n)

    def fail(self, message: str) -> ComponentError:
        """A ComponentError for this process, with its exit code (if any) and log tail."""
        code = self.exited()
        if code is not None:
            message += f" (process exited with code {code})"
        return ComponentError(self.name, message, self.log_tail())

    def _poll_until(self, probe: Callable[[], bool], timeout: float, what: str) -> None:
        """Call ``probe()`` until it returns True; fail fast if the process exits."""
        deadline = time.monotonic() + timeout
        last_error = ""
        while True:
            if self.exited() is not None:
                raise self.fail(f"exited before {what}")
            try:
                if probe():
                    return
            except (OSError, http.client.HTTPException, ValueError, EtcdError) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                suffix = f"; last error: {last_error}" if last_error else ""
                raise self.fail(f"not {what} after {timeout:.0f}s{suffix}")
            time.sleep(0.1)


def _port_in_use(log_tail: str) -> bool:
    return "address already in use" in log_tail.lower()


# --------------------------------------------------------------------------------------------------
# etcd
# --------------------------------------------------------------------------------------------------


class Etcd(ManagedProcess):
    """A single-member etcd with client TLS and client-cert auth, data in ``dir/data``.

    Raw key access goes through :class:`keyward.etcd.EtcdClient` with the admin client cert (etcd
    accepts any cert the CA signed): :meth:`get`, :meth:`keys`, :meth:`items`, or :attr:`client`.
    """

    name = "etcd"
    exe_name = "etcd"

    def __init__(self, dir: Path, pki: Pki, bin_dir: Path | None = None) -> None:
        super().__init__(dir)
        self.pki = pki
        self.bin_dir = Path(bin_dir) if bin_dir else keyward_bin_dir()
        self.data_dir = self.dir / "data"
        self.port = 0
        self.peer_port = 0
        # What clients (tests, the keyward CLI, the demo) use to read etcd directly.
        self.ca_cert = pki.ca_cert
        self.client_cert = pki.admin_cert
        self.client_key = pki.admin_key

    @property
    def endpoint(self) -> str:
        return f"https://{LOOPBACK}:{self.port}"

    @property
    def client(self) -> EtcdClient:
        """A raw client for this etcd (valid once started)."""
        return EtcdClient(self.endpoint, self.ca_cert, self.client_cert, self.client_key)

    def command(self) -> list[str]:
        client_url = self.endpoint
        peer_url = f"http://{LOOPBACK}:{self.peer_port}"
        return [
            str(self.bin_dir / "etcd"),
            "--name=default",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=default={peer_url}",
            "--initial-cluster-state=new",
            f"--cert-file={self.pki.etcd_server_cert}",
            f"--key-file={self.pki.etcd_server_key}",
            f"--trusted-ca-file={self.pki.ca_cert}",
            "--client-cert-auth",
            "--unsafe-no-fsync",
            "--log-level=warn",
        ]

    def start(self, timeout: float = 30.0) -> None:
        """Start on free ports and wait for /health (retries with new ports if one was taken)."""
        for attempt in range(3):
            self.port, self.peer_port = free_port(), free_port()
            self.spawn()
            try:
                self.wait_ready(timeout)
                return
            except ComponentError:
                if attempt < 2 and self.exited() is not None and _port_in_use(self.log_tail()):
                    self.stop()
                    continue
                self.stop()
                raise

    def wait_ready(self, timeout: float = 30.0) -> None:
        client = self.client
        self._poll_until(client.healthy, timeout, "healthy")

    def compact(self, revision: int | None = None) -> int:
        """Compacts history up to ``revision`` (default: now), as kube-apiserver does every 5 minutes."""
        rev = revision or self.client.current_revision(b"/")
        status, body = _https_request(
            self.pki.admin_ssl_context(),
            self.port,
            "POST",
            "/v3/kv/compaction",
            json.dumps({"revision": rev, "physical": True}).encode(),
            headers={"Content-Type": "application/json"},
        )
        if status != 200:
            raise RuntimeError(f"etcd compaction failed: HTTP {status}: {body[:300]!r}")
        return rev

    def get(self, key: str) -> bytes | None:
        """The raw stored value of ``key``, or None."""
        return self.client.get(key)

    def keys(self, prefix: str) -> list[str]:
        """Every key starting with ``prefix``, sorted."""
        return self.client.keys(prefix)

    def items(self, prefix: str) -> dict[str, bytes]:
        """Every key starting with ``prefix`` with its raw value."""
        return self.client.items(prefix)


# --------------------------------------------------------------------------------------------------
# kube-apiserver
# --------------------------------------------------------------------------------------------------


def write_encryption_config(
    path: Path, socket_path: Path | str, provider_name: str = "keyward", timeout: str = "3s"
) -> Path:
    """Write an EncryptionConfiguration: Secrets through the KMS v2 plugin, then identity for old data."""
    if ":" in provider_name:
        raise ValueError("a KMS provider name may not contain ':'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    endpoint = f"unix://{socket_path}"
    # JSON strings are valid YAML scalars: this quotes paths and names safely.
    path.write_text(
        "# Written by hack/localcluster.py\n"
        "apiVersion: apiserver.config.k8s.io/v1\n"
        "kind: EncryptionConfiguration\n"
        "resources:\n"
        "  - resources:\n"
        "      - secrets\n"
        "    providers:\n"
        "      - kms:\n"
        "          apiVersion: v2\n"
        f"          name: {json.dumps(provider_name)}\n"
        f"          endpoint: {json.dumps(endpoint)}\n"
        f"          timeout: {json.dumps(timeout)}\n"
        "      - identity: {}\n"
    )
    return path


class KubeApiserver(ManagedProcess):
    """kube-apiserver on a free 127.0.0.1 port, backed by :class:`Etcd`, admin kubeconfig in ``dir``."""

    name = "kube-apiserver"
    exe_name = "kube-apiserver"

    def __init__(
        self,
        dir: Path,
        pki: Pki,
        etcd: Etcd,
        bin_dir: Path | None = None,
        *,
        encryption_config: Path | None = None,
        etcd_prefix: str = "/registry",
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(dir)
        self.pki = pki
        self.etcd = etcd
        self.bin_dir = Path(bin_dir) if bin_dir else keyward_bin_dir()
        self.encryption_config = encryption_config
        self.etcd_prefix = etcd_prefix
        self.extra_args = list(extra_args)
        self.port = 0
        self.kubeconfig = self.dir / "kubeconfig"
        self._ctx: ssl.SSLContext | None = None

    @property
    def url(self) -> str:
        return f"https://{LOOPBACK}:{self.port}"

    def command(self) -> list[str]:
        pki = self.pki
        args = [
            str(self.bin_dir / "kube-apiserver"),
            f"--etcd-servers={self.etcd.endpoint}",
            f"--etcd-cafile={pki.ca_cert}",
            f"--etcd-certfile={pki.etcd_client_cert}",
            f"--etcd-keyfile={pki.etcd_client_key}",
            f"--etcd-prefix={self.etcd_prefix}",
            f"--secure-port={self.port}",
            f"--bind-address={LOOPBACK}",
            f"--advertise-address={LOOPBACK}",
            f"--cert-dir={self.dir / 'certs'}",
            f"--tls-cert-file={pki.apiserver_cert}",
            f"--tls-private-key-file={pki.apiserver_key}",
            f"--client-ca-file={pki.ca_cert}",
            "--authorization-mode=RBAC",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            "--disable-admission-plugins=ServiceAccount",
            "--allow-privileged=true",
            # Lean start: no API priority and fairness bootstrap objects, no profiling endpoints.
            "--enable-priority-and-fairness=false",
            "--profiling=false",
            # The `kubernetes` Service's Endpoints cannot hold a loopback address (validation rejects
            # 127.0.0.1 every 10 s); nothing here needs them.
            "--endpoint-reconciler-type=none",
        ]
        if self.encryption_config is not None:
            args += [
                f"--encryption-provider-config={self.encryption_config}",
                "--encryption-provider-config-automatic-reload=false",
            ]
        return args + self.extra_args

    def start(self, timeout: float = 120.0, ready_path: str = "/readyz") -> None:
        """Write the kubeconfig, start on a free port (kept across restarts), wait for ``ready_path``."""
        for attempt in range(3):
            if not self.port or attempt:
                self.port = free_port()
            self.write_kubeconfig()
            self.spawn()
            try:
                self.wait_ready(timeout, ready_path)
                return
            except ComponentError:
                if attempt < 2 and self.exited() is not None and _port_in_use(self.log_tail()):
                    self.stop()
                    continue
                self.stop()
                raise

    def restart(self, timeout: float = 120.0, ready_path: str = "/readyz") -> None:
        """Stop and start again on the same port (the kubeconfig stays valid)."""
        self.stop()
        self.start(timeout, ready_path)

    def _tls(self) -> ssl.SSLContext:
        if self._ctx is None:
            self._ctx = self.pki.admin_ssl_context()
        return self._ctx

    def wait_ready(self, timeout: float = 120.0, path: str = "/readyz") -> None:
        """Poll GET ``path`` with the admin cert until it answers 200.

        ``/readyz`` includes the KMS check when an encryption config is set; to wait for an apiserver
        whose plugin is down on purpose, pass e.g. ``path="/readyz?exclude=kms-providers"``.
        """
        self._poll_until(lambda: self.get(path, timeout=5.0)[0] == 200, timeout, f"ready ({path})")

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        content_type: str = "application/json",
        timeout: float = 30.0,
    ) -> tuple[int, str]:
        """One request as the admin user; returns (status, body text)."""
        headers = {"Content-Type": content_type} if body is not None else {}
        status, data = _https_request(
            self._tls(), self.port, method, path, body, headers=headers, timeout=timeout
        )
        return status, data.decode("utf-8", errors="replace")

    def get(self, path: str, *, timeout: float = 30.0) -> tuple[int, str]:
        """GET ``path`` as the admin user, e.g. ``/readyz/kms-providers?verbose``."""
        return self.request("GET", path, timeout=timeout)

    def metrics(self) -> str:
        """The Prometheus text of /metrics."""
        status, body = self.get("/metrics")
        if status != 200:
            raise RuntimeError(f"GET /metrics: HTTP {status}: {body[:500]}")
        return body

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run ``kubectl --kubeconfig <ours> ARGS`` and capture its output."""
        proc = subprocess.run(
            [str(self.bin_dir / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            check=False,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"kubectl {shlex.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def write_kubeconfig(self) -> Path:
        """Write ``dir/kubeconfig`` (mode 0600) for the admin user, credentials embedded."""
        write_kubeconfig(self.kubeconfig, self.url, self.pki)
        return self.kubeconfig


def write_kubeconfig(path: Path, server: str, pki: Pki, context: str = "keyward-local") -> None:
    """An admin kubeconfig with embedded credentials, usable by kubectl, kopf and the kubernetes client."""

    def b64(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    user = {"client-certificate-data": b64(pki.admin_cert), "client-key-data": b64(pki.admin_key)}
    _write_kubeconfig(path, server, pki.ca_cert, user_name=ADMIN_USER, user=user, context=context)


def write_token_kubeconfig(
    path: Path, server: str, ca_cert: Path, *, user_name: str, token: str, context: str = "keyward-local"
) -> None:
    """A kubeconfig that authenticates with a bearer token, such as a ServiceAccount's (kubectl create token).

    Unlike impersonation (``as:`` in a kubeconfig, which kubectl honours but the Python kubernetes client and
    Kopf ignore), a token makes every client act as that account, so its RBAC is what applies.
    """
    _write_kubeconfig(path, server, ca_cert, user_name=user_name, user={"token": token}, context=context)


def _write_kubeconfig(
    path: Path, server: str, ca_cert: Path, *, user_name: str, user: Mapping[str, str], context: str
) -> None:
    ca_data = base64.b64encode(ca_cert.read_bytes()).decode()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": context, "cluster": {"server": server, "certificate-authority-data": ca_data}}],
        "users": [{"name": user_name, "user": dict(user)}],
        "contexts": [{"name": context, "context": {"cluster": context, "user": user_name}}],
        "current-context": context,
        "preferences": {},
    }
    # JSON is YAML: every kubeconfig reader accepts it.
    _write_private(path, (json.dumps(config, indent=2) + "\n").encode())


# --------------------------------------------------------------------------------------------------
# The Keyward KMS plugin
# --------------------------------------------------------------------------------------------------


def default_keyward_bin() -> Path:
    """The ``keyward`` console script installed next to the running Python."""
    return venv_bin_dir() / "keyward"


def socket_accepts(path: Path) -> bool:
    """True if something accepts connections on the unix socket ``path`` (a stale file does not)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(path))
        except OSError:
            return False
        return True


class Plugin(ManagedProcess):
    """The Keyward KMS v2 plugin: ``keyward plugin serve --socket PATH --key NAME`` on ``token``."""

    name = "plugin"
    exe_name = "keyward"

    def __init__(
        self,
        dir: Path,
        token: SoftHsmToken,
        socket_path: Path,
        *,
        key_name: str = "secrets",
        keyward_bin: Path | None = None,
        extra_args: Sequence[str] = (),
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(dir)
        self.token = token
        self.socket_path = Path(socket_path)
        if len(str(self.socket_path).encode()) >= MAX_SOCKET_PATH:
            raise ValueError(f"unix socket path too long ({len(str(self.socket_path))} bytes): {socket_path}")
        self.key_name = key_name
        self.keyward_bin = Path(keyward_bin) if keyward_bin else default_keyward_bin()
        self.extra_args = list(extra_args)
        self.extra_env = dict(extra_env or {})

    def command(self) -> list[str]:
        return [
            str(self.keyward_bin),
            "plugin",
            "serve",
            "--socket",
            str(self.socket_path),
            "--key",
            self.key_name,
            *self.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        return {**os.environ, **self.token.env(), **self.extra_env}

    def start(self, timeout: float = 30.0) -> None:
        """Start and wait until the socket accepts connections (a stale socket file does not count)."""
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        self.spawn_and_wait(timeout)

    def wait_ready(self, timeout: float = 30.0) -> None:
        self._poll_until(lambda: socket_accepts(self.socket_path), timeout, "listening")


class Operator(ManagedProcess):
    """The Keyward operator: ``keyward operator run`` against ``kubeconfig`` and ``token``.

    Ready when it has either started reconciling (it holds the leader Lease) or logged that it waits
    for the Lease (another replica leads).
    """

    name = "operator"
    exe_name = "keyward"

    def __init__(
        self,
        dir: Path,
        token: SoftHsmToken,
        kubeconfig: Path,
        *,
        interval: float = 2.0,
        keyward_bin: Path | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(dir)
        self.token = token
        self.kubeconfig = Path(kubeconfig)
        self.interval = interval
        self.keyward_bin = Path(keyward_bin) if keyward_bin else default_keyward_bin()
        self.extra_env = dict(extra_env or {})
        self._log_offset = 0

    def command(self) -> list[str]:
        return [str(self.keyward_bin), "operator", "run", "--interval", str(self.interval)]

    def environment(self) -> dict[str, str]:
        return {**os.environ, **self.token.env(), "KUBECONFIG": str(self.kubeconfig), **self.extra_env}

    def start(self, timeout: float = 60.0) -> None:
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.spawn_and_wait(timeout)

    def wait_ready(self, timeout: float = 60.0) -> None:
        def started() -> bool:
            with self.log_path.open("rb") as log:
                log.seek(self._log_offset)
                text = log.read()
            return b"operator.started" in text or b"leadership.waiting" in text

        self._poll_until(started, timeout, "reconciling or waiting for the leader Lease")


# --------------------------------------------------------------------------------------------------
# The CLI: up / down / env / status
# --------------------------------------------------------------------------------------------------


class State:
    """The layout of a ``--state DIR`` and the facts ``up`` records in ``DIR/state.json``."""

    COMPONENTS: ClassVar[tuple[tuple[str, str, str], ...]] = (
        # (component, sub-directory, argv name checked against the recorded pid)
        ("plugin", "plugin", Plugin.exe_name),
        ("etcd", "etcd", Etcd.exe_name),
        ("kube-apiserver", "apiserver", KubeApiserver.exe_name),
        ("operator", "operator", Operator.exe_name),
    )

    def __init__(self, dir: Path) -> None:
        self.dir = Path(dir).absolute()
        self.file = self.dir / "state.json"

    def pid_file(self, component: str) -> Path:
        """Where ManagedProcess.spawn() records the pid: DIR/<sub-directory>/<component>.pid."""
        sub = {c: s for c, s, _ in self.COMPONENTS}[component]
        return self.dir / sub / f"{component}.pid"

    def pid(self, component: str) -> int | None:
        try:
            return int(self.pid_file(component).read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def alive(self, component: str) -> bool:
        pid = self.pid(component)
        exe = {c: e for c, _, e in self.COMPONENTS}[component]
        return pid is not None and pid_matches(pid, exe)

    def all_alive(self) -> bool:
        return all(self.alive(c) for c, _, _ in self.COMPONENTS)

    def load(self) -> dict[str, str]:
        try:
            data: dict[str, str] = json.loads(self.file.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return data

    def save(self, facts: Mapping[str, str]) -> None:
        self.file.write_text(json.dumps(dict(facts), indent=2, sort_keys=True) + "\n")

    def socket_path(self) -> tuple[Path, Path | None]:
        """Where the KMS socket goes: DIR/kms.sock, or a short /tmp directory if that is too long.

        Returns (socket path, the /tmp directory to remove on ``down`` or None).
        """
        preferred = self.dir / "kms.sock"
        if len(str(preferred).encode()) < MAX_SOCKET_PATH:
            return preferred, None
        short = Path(tempfile.mkdtemp(prefix="keyward-", dir="/tmp"))
        return short / "kms.sock", short


def _stop_recorded(state: State) -> None:
    # Stop in reverse start order: the apiserver first, the plugin last.
    for component, _, exe in reversed(State.COMPONENTS):
        pid = state.pid(component)
        if pid is not None:
            terminate_pid(pid, exe)
        with contextlib.suppress(FileNotFoundError):
            state.pid_file(component).unlink()


def _remove_state(state: State) -> None:
    extra = state.load().get("socket_tmp_dir")
    if extra and Path(extra).parent == Path("/tmp") and Path(extra).name.startswith("keyward-"):
        shutil.rmtree(extra, ignore_errors=True)
    shutil.rmtree(state.dir, ignore_errors=True)


def _create_key(token: SoftHsmToken, key_name: str, keyward_bin: Path) -> None:
    """``keyward keys create NAME`` on the token; a key that already exists is fine."""
    if not keyward_bin.exists():
        raise ComponentError("keyward", f"{keyward_bin} not found (run hack/bootstrap.sh)")
    proc = subprocess.run(
        [str(keyward_bin), "keys", "create", key_name],
        env={**os.environ, **token.env()},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    output = proc.stdout + proc.stderr
    if proc.returncode != 0 and "already exists" not in output.lower():
        raise ComponentError("keyward keys create", f"exited {proc.returncode}", output)


def cmd_up(
    state: State, *, key_name: str = "secrets", timeout: float = 180.0, keyward_bin: Path | None = None
) -> int:
    """Start plugin, etcd and kube-apiserver in ``state.dir`` unless they already run.

    On any failure, stops what this call started (logs stay in ``state.dir``) and re-raises.
    """
    if state.all_alive():
        facts = state.load()
        print(
            f"keyward local control plane already up: {facts.get('apiserver_url', '?')} (state {state.dir})"
        )
        return 0
    _stop_recorded(state)
    _remove_state(state)
    state.dir.mkdir(parents=True)

    started: list[ManagedProcess] = []

    def stop_started() -> None:
        for proc in reversed(started):
            with contextlib.suppress(Exception):
                proc.stop()

    try:
        summary = _start_all(state, started, key_name, timeout, keyward_bin or default_keyward_bin())
    except Exception as exc:
        print(_describe(exc), file=sys.stderr)
        stop_started()
        print(
            f"local control plane NOT started; stopped what had started; logs in {state.dir}", file=sys.stderr
        )
        return 1
    except BaseException:  # Ctrl-C, SIGTERM: clean up, then let it end the program
        stop_started()
        raise
    print(summary)
    print('Use it from your shell:  eval "$(make -s env)"')
    return 0


def _start_all(
    state: State, started: list[ManagedProcess], key_name: str, timeout: float, keyward_bin: Path
) -> str:
    """Make PKI, token and key, start plugin, etcd and kube-apiserver; record facts; return a summary.

    Appends each process to ``started`` before starting it, so the caller can stop them on failure.
    """
    t0 = time.monotonic()
    bin_dir = keyward_bin_dir()
    for binary in ("etcd", "kube-apiserver", "kubectl"):
        if not (bin_dir / binary).exists():
            raise ComponentError("binaries", f"{bin_dir / binary} missing (run hack/build-binaries.sh)")
    pki = Pki(state.dir / "pki")
    token = SoftHsmToken(state.dir / "softhsm")
    _create_key(token, key_name, keyward_bin)
    socket_path, socket_tmp = state.socket_path()
    if socket_tmp is not None:
        state.save({"socket_tmp_dir": str(socket_tmp)})  # so that `down` removes it even after a failure
        print(f"note: {state.dir / 'kms.sock'} is too long for a unix socket; using {socket_path}")

    plugin = Plugin(state.dir / "plugin", token, socket_path, key_name=key_name, keyward_bin=keyward_bin)
    etcd = Etcd(state.dir / "etcd", pki, bin_dir)
    enc = write_encryption_config(state.dir / "encryption-config.yaml", socket_path)
    apiserver = KubeApiserver(state.dir / "apiserver", pki, etcd, bin_dir, encryption_config=enc)
    procs: list[ManagedProcess] = [plugin, etcd, apiserver]
    for proc in procs:
        proc.detach = True  # keep running after this command exits
    started.append(plugin)
    plugin.start()
    started.append(etcd)
    etcd.start()
    started.append(apiserver)
    apiserver.start(timeout)
    status, body = apiserver.get("/readyz/kms-providers?verbose")
    if status != 200:
        raise apiserver.fail(f"/readyz/kms-providers answered {status}: {body.strip()}")
    _install_operator(
        state, apiserver, token=token, started=started, key_name=key_name, keyward_bin=keyward_bin
    )
    elapsed = time.monotonic() - t0

    facts = {
        "apiserver_url": apiserver.url,
        "kubeconfig": str(apiserver.kubeconfig),
        "bin_dir": str(bin_dir),
        "venv_bin": str(venv_bin_dir()),
        "etcd_endpoint": etcd.endpoint,
        "etcd_cacert": str(etcd.ca_cert),
        "etcd_cert": str(etcd.client_cert),
        "etcd_key": str(etcd.client_key),
        "kms_socket": str(socket_path),
        "encryption_config": str(enc),
        "key_name": key_name,
        **{name.lower(): value for name, value in token.env().items()},
    }
    if socket_tmp is not None:
        facts["socket_tmp_dir"] = str(socket_tmp)
    state.save(facts)
    return "\n".join(
        [
            f"keyward local control plane up in {elapsed:.1f}s (state {state.dir})",
            f"  kube-apiserver  {apiserver.url}  pid {apiserver.pid}",
            f"  etcd            {etcd.endpoint}  pid {etcd.pid}",
            f"  kms plugin      unix://{socket_path}  pid {plugin.pid}  key {key_name!r}",
            f"  SoftHSM2 token  {token.label!r}  ({token.conf_path})",
            f"  operator        EncryptionKey {key_name!r} Ready  (kubectl get encryptionkeys)",
        ]
    )


REPO = Path(__file__).resolve().parents[1]


def _install_operator(
    state: State,
    apiserver: KubeApiserver,
    *,
    token: SoftHsmToken,
    started: list[ManagedProcess],
    key_name: str,
    keyward_bin: Path,
) -> None:
    """CRDs, the example RotationPolicy and EncryptionKey for the served key, and the operator."""
    apiserver.kubectl("apply", "-f", str(REPO / "deploy" / "crds"))
    apiserver.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
    example = (REPO / "deploy" / "examples" / "secrets-key.yaml").read_text()
    apiserver.kubectl("apply", "-f", "-", input=example.replace("name: secrets ", f"name: {key_name} "))
    operator = Operator(
        state.dir / "operator", token, apiserver.kubeconfig, interval=5.0, keyward_bin=keyward_bin
    )
    operator.detach = True
    started.append(operator)
    operator.start()
    jsonpath = '{.status.conditions[?(@.type=="Ready")].status}'
    operator._poll_until(
        lambda: (
            apiserver.kubectl(
                "get", "encryptionkey", key_name, "-o", f"jsonpath={jsonpath}", check=False
            ).stdout
            == "True"
        ),
        60,
        f"reporting EncryptionKey {key_name!r} Ready",
    )


def cmd_down(state: State) -> int:
    """Stop every recorded process and remove the state directory. Idempotent."""
    _stop_recorded(state)
    existed = state.dir.exists()
    _remove_state(state)
    print("keyward local control plane stopped" if existed else "keyward local control plane was not up")
    return 0


TOKEN_ENV = ("SOFTHSM2_CONF", "KEYWARD_PKCS11_MODULE", "KEYWARD_TOKEN_LABEL", "KEYWARD_PIN_FILE")


def token_env(facts: Mapping[str, str]) -> dict[str, str]:
    """The token settings ``up`` recorded (``SoftHsmToken.env()``, keys lowercased), as an environment."""
    return {name: facts[name.lower()] for name in TOKEN_ENV}


def cmd_env(state: State) -> int:
    """Print ``export`` lines for a shell to use the running control plane."""
    facts = state.load()
    if not facts or not state.all_alive():
        print(
            f"keyward local control plane is not up (state {state.dir}); start it with `make up`",
            file=sys.stderr,
        )
        return 1
    q = shlex.quote
    exports = {
        "KUBECONFIG": facts["kubeconfig"],
        "KEYWARD_ETCD_ENDPOINTS": facts["etcd_endpoint"],
        "KEYWARD_ETCD_CACERT": facts["etcd_cacert"],
        "KEYWARD_ETCD_CERT": facts["etcd_cert"],
        "KEYWARD_ETCD_KEY": facts["etcd_key"],
        **token_env(facts),
        "KEYWARD_KMS_SOCKET": facts["kms_socket"],
    }
    print(f'export PATH={q(facts["bin_dir"])}:{q(facts["venv_bin"])}:"$PATH"')
    for name, value in exports.items():
        print(f"export {name}={q(value)}")
    return 0


def cmd_status(state: State) -> int:
    """One line per component; exit 0 only if all run."""
    facts = state.load()
    where = {
        "plugin": f"unix://{facts['kms_socket']}" if "kms_socket" in facts else "",
        "etcd": facts.get("etcd_endpoint", ""),
        "kube-apiserver": facts.get("apiserver_url", ""),
    }
    all_up = True
    for component, _, _ in State.COMPONENTS:
        pid = state.pid(component)
        if state.alive(component):
            print(f"{component:<15} running  pid {pid}  {where[component]}")
        else:
            all_up = False
            print(f"{component:<15} not running")
    return 0 if all_up else 1


def _describe(exc: Exception) -> str:
    return exc.report() if isinstance(exc, ComponentError) else f"{type(exc).__name__}: {exc}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="localcluster.py", description="Run Keyward's local control plane as plain processes."
    )
    parser.add_argument("command", choices=["up", "down", "env", "status"])
    parser.add_argument("--state", type=Path, required=True, help="state directory (pids, certs, logs)")
    parser.add_argument("--key", default="secrets", help="HSM key name the plugin uses (up)")
    parser.add_argument("--timeout", type=float, default=180.0, help="apiserver readiness timeout (up)")
    parser.add_argument(
        "--keyward-bin", type=Path, default=None, help="the keyward CLI (up; default: next to this Python)"
    )
    args = parser.parse_args(argv)
    state = State(args.state)

    def on_sigterm(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds `up`, which then stops what it started

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        if args.command == "up":
            return cmd_up(state, key_name=args.key, timeout=args.timeout, keyward_bin=args.keyward_bin)
        if args.command == "down":
            return cmd_down(state)
        if args.command == "env":
            return cmd_env(state)
        return cmd_status(state)
    except Exception as exc:  # report, never a traceback: the Makefile's user wants the reason
        print(f"localcluster {args.command}: {_describe(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
