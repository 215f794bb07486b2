"""The KMS v2 plugin as kube-apiserver meets it: a process on a Unix socket over a real SoftHSM2 token."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import stat
import subprocess
import sys
import time

import grpc
import pytest

import localcluster
from conftest import KEYWARD, wait_for
from kmsplugin.client import KmsClient
from localcluster import socket_accepts


def audit_events(plugin, event):
    lines = [json.loads(line) for line in plugin.log_path.read_text().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == event]


def rpc_error(call):
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_status_reports_v2_ok_and_the_primary_key_id(start_plugin, keyward):
    plugin = start_plugin()
    listed = json.loads(keyward("keys", "list", "--json").stdout)
    with KmsClient(plugin.socket_path) as kms:
        status = kms.status()
    assert (status.version, status.healthz) == ("v2", "ok")
    assert status.key_id == listed[0]["primaryKeyId"]


def test_encrypt_then_decrypt_returns_exactly_the_bytes_and_audits_each_call(start_plugin):
    plugin = start_plugin()
    seed = os.urandom(32)
    with KmsClient(plugin.socket_path) as kms:
        status = kms.status()
        sealed = kms.encrypt(seed, uid="uid-enc")
        assert sealed.key_id == status.key_id
        assert seed not in sealed.ciphertext
        assert kms.decrypt(sealed.ciphertext, sealed.key_id, uid="uid-dec") == seed
    enc = wait_for(lambda: audit_events(plugin, "kms.encrypt"), timeout=5, what="encrypt audit event")
    dec = audit_events(plugin, "kms.decrypt")
    assert (
        enc[-1]["uid"] == "uid-enc" and enc[-1]["outcome"] == "success" and enc[-1]["key_id"] == status.key_id
    )
    assert dec[-1]["uid"] == "uid-dec" and "latency_ms" in dec[-1]
    assert seed.hex() not in plugin.log_path.read_text()


def test_bad_requests_get_distinct_clear_errors_and_the_plugin_stays_up(start_plugin):
    plugin = start_plugin()
    with KmsClient(plugin.socket_path) as kms:
        sealed = kms.encrypt(os.urandom(32))
        ct, kid = sealed.ciphertext, sealed.key_id
        tampered = bytearray(ct)
        tampered[-1] ^= 1
        other_version = kid.replace("/v1/", "/v2/")
        cases = {
            "unknown key_id": (
                lambda: kms.decrypt(ct, "secrets/v7/" + "0" * 24),
                grpc.StatusCode.NOT_FOUND,
                "unknown key_id",
            ),
            "foreign key_id": (
                lambda: kms.decrypt(ct, "other-plugin-key"),
                grpc.StatusCode.NOT_FOUND,
                "unknown key_id",
            ),
            "tampered": (
                lambda: kms.decrypt(bytes(tampered), kid),
                grpc.StatusCode.DATA_LOSS,
                "failed authentication",
            ),
            "truncated header": (
                lambda: kms.decrypt(ct[:30], kid),
                grpc.StatusCode.INVALID_ARGUMENT,
                "truncated: 30 bytes",
            ),
            "truncated body": (
                lambda: kms.decrypt(ct[:-5], kid),
                grpc.StatusCode.DATA_LOSS,
                "truncated or corrupted",
            ),
            "not ours": (
                lambda: kms.decrypt(b"garbage" * 10, kid),
                grpc.StatusCode.INVALID_ARGUMENT,
                "not in Keyward's format",
            ),
            "empty ciphertext": (
                lambda: kms.decrypt(b"", kid),
                grpc.StatusCode.INVALID_ARGUMENT,
                "ciphertext is empty",
            ),
            "oversized ciphertext": (
                lambda: kms.decrypt(ct * 20, kid),
                grpc.StatusCode.INVALID_ARGUMENT,
                "the limit is 1024",
            ),
            "empty key_id": (
                lambda: kms.decrypt(ct, ""),
                grpc.StatusCode.INVALID_ARGUMENT,
                "key_id is empty",
            ),
            "oversized key_id": (
                lambda: kms.decrypt(ct, "k" * 1025),
                grpc.StatusCode.INVALID_ARGUMENT,
                "key_id is 1025 bytes",
            ),
            "bad annotation": (
                lambda: kms.decrypt(ct, kid, annotations={"nodots": b"x"}),
                grpc.StatusCode.INVALID_ARGUMENT,
                "fully qualified domain name",
            ),
            "empty plaintext": (
                lambda: kms.encrypt(b""),
                grpc.StatusCode.INVALID_ARGUMENT,
                "plaintext is empty",
            ),
            "oversized plaintext": (
                lambda: kms.encrypt(b"p" * 4096),
                grpc.StatusCode.INVALID_ARGUMENT,
                "at most 512",
            ),
        }
        for name, (call, code, text) in cases.items():
            got_code, details = rpc_error(call)
            assert got_code == code, name
            assert text in details, f"{name}: {details}"
        # A key_id of a version that exists, presented with another version's ciphertext: a mismatch.
        subprocess.run(
            [str(KEYWARD), "keys", "rotate", "secrets"],
            env=plugin.environment(),
            check=True,
            capture_output=True,
        )
        wait_for(lambda: kms.status().key_id != kid, timeout=10, what="rotation to show in Status")
        code, details = rpc_error(lambda: kms.decrypt(ct, kms.status().key_id))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "not made under key_id" in details
        assert other_version.startswith("secrets/v2/")
        # Still serving, still correct.
        assert kms.decrypt(ct, kid) and kms.status().healthz == "ok"
    assert plugin.running()


def test_a_rotation_shows_in_status_within_seconds_and_old_data_still_decrypts(start_plugin, keyward):
    plugin = start_plugin()
    with KmsClient(plugin.socket_path) as kms:
        old = kms.status().key_id
        sealed = kms.encrypt(b"s" * 32)
        keyward("keys", "rotate", "secrets")
        started = time.monotonic()
        new = wait_for(lambda: (kid := kms.status().key_id) != old and kid, timeout=10, what="new key_id")
        assert time.monotonic() - started < 10
        assert new.startswith("secrets/v2/")
        assert kms.encrypt(b"n" * 32).key_id == new
        assert kms.decrypt(sealed.ciphertext, old) == b"s" * 32


def test_a_disabled_version_is_refused_and_decrypts_again_once_enabled(start_plugin, keyward):
    plugin = start_plugin()
    with KmsClient(plugin.socket_path) as kms:
        old = kms.status().key_id
        sealed = kms.encrypt(b"d" * 32)
        keyward("keys", "rotate", "secrets")
        keyward("keys", "disable", "secrets", "1")
        code, details = wait_for(
            lambda: (r := _try_decrypt(kms, sealed.ciphertext, old)) and r[0] != grpc.StatusCode.OK and r,
            timeout=10,
            what="decrypt with the disabled version to be refused",
        )
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert "Disabled" in details
        keyward("keys", "enable", "secrets", "1")
        wait_for(
            lambda: _try_decrypt(kms, sealed.ciphertext, old)[0] == grpc.StatusCode.OK,
            timeout=10,
            what="decrypt after enable",
        )


def _try_decrypt(kms, ct, kid):
    try:
        kms.decrypt(ct, kid)
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


def test_the_socket_is_private_to_its_owner(start_plugin):
    plugin = start_plugin()
    assert stat.S_IMODE(plugin.socket_path.stat().st_mode) == 0o600


def test_a_stale_socket_left_by_a_crash_is_replaced(start_plugin):
    first = start_plugin(name="crash")
    first.kill()
    assert first.socket_path.exists(), "SIGKILL should leave the socket file behind"
    second = start_plugin(name="crash")
    with KmsClient(second.socket_path) as kms:
        assert kms.status().healthz == "ok"


def test_start_up_is_refused_while_a_live_plugin_serves_the_socket(start_plugin):
    live = start_plugin(name="live")
    intruder = start_plugin(name="live", wait=False)
    wait_for(lambda: intruder.exited() is not None, timeout=30, what="the second plugin to exit")
    assert intruder.exited() == 2
    assert "already serving" in intruder.log_path.read_text()
    with KmsClient(live.socket_path) as kms:
        assert kms.status().healthz == "ok"


def test_sigterm_lets_in_flight_calls_finish_and_removes_the_socket(start_plugin):
    plugin = start_plugin()
    with KmsClient(plugin.socket_path) as kms:
        sealed = kms.encrypt(b"t" * 32)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            calls = [pool.submit(kms.decrypt, sealed.ciphertext, sealed.key_id) for _ in range(200)]
            time.sleep(0.05)
            os.kill(plugin.pid or 0, signal.SIGTERM)
            results = [c.exception() or c.result() for c in calls]
    # Calls that reached a handler complete; later ones are refused (retryable), never answered wrongly.
    done = [r for r in results if r == b"t" * 32]
    refused = [r for r in results if isinstance(r, grpc.RpcError)]
    assert len(done) + len(refused) == 200 and done
    retryable = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
    assert {r.code() for r in refused} <= retryable, [(r.code(), r.details()) for r in refused]
    wait_for(lambda: plugin.exited() is not None, timeout=20, what=f"exit; log:\n{plugin.log_tail(15)}")
    assert plugin.exited() == 0
    assert not plugin.socket_path.exists()
    handled = audit_events(plugin, "kms.decrypt")
    assert handled and all(e["outcome"] == "success" for e in handled), "a started call failed during stop"
    assert len([e for e in handled if e["outcome"] == "success"]) == len(done)


def test_a_burst_of_concurrent_decrypts_is_served_well_inside_the_apiservers_timeout(start_plugin):
    plugin = start_plugin()
    with KmsClient(plugin.socket_path, timeout=3.0) as kms:
        sealed = [kms.encrypt(os.urandom(32)) for _ in range(16)]

        def decrypt(i: int) -> float:
            s = sealed[i % len(sealed)]
            t0 = time.monotonic()
            kms.decrypt(s.ciphertext, s.key_id)
            return time.monotonic() - t0

        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            latencies = list(pool.map(decrypt, range(3000)))
    assert len(latencies) == 3000  # none failed: every call answered within the 3 s deadline
    assert plugin.running()


def test_a_wrong_pin_makes_status_not_ok_without_retrying_and_a_fixed_pin_recovers(start_plugin, token):
    real_pin = token.pin_file.read_text()
    token.pin_file.write_text("000000")
    plugin = start_plugin()
    with KmsClient(plugin.socket_path) as kms:
        for _ in range(4):
            status = kms.status()
            assert status.healthz != "ok"
            assert "incorrect PIN" in status.healthz
            time.sleep(0.6)
        code, details = rpc_error(lambda: kms.encrypt(b"x" * 32))
        assert code == grpc.StatusCode.UNAVAILABLE and "incorrect PIN" in details
        log = plugin.log_path.read_text()
        assert log.count("pkcs11.login_failed") == 1, "the plugin must not retry a refused PIN"
        assert "000000" not in log and real_pin not in log
        token.pin_file.write_text(real_pin)
        wait_for(lambda: kms.status().healthz == "ok", timeout=15, what="recovery after fixing the PIN file")
    assert plugin.running()


def test_a_missing_module_is_a_clear_start_up_error(start_plugin, short_tmp):
    plugin = start_plugin(extra_env={"KEYWARD_PKCS11_MODULE": str(short_tmp / "nope.so")}, wait=False)
    wait_for(lambda: plugin.exited() is not None, timeout=30, what="the plugin to exit")
    assert plugin.exited() == 2
    log = plugin.log_path.read_text()
    assert "nope.so does not exist" in log and "Traceback" not in log


def test_a_missing_token_is_a_clear_start_up_error_naming_the_tokens_present(start_plugin):
    plugin = start_plugin(extra_env={"KEYWARD_TOKEN_LABEL": "no-such-token"}, wait=False)
    wait_for(lambda: plugin.exited() is not None, timeout=30, what="the plugin to exit")
    assert plugin.exited() == 2
    log = plugin.log_path.read_text()
    assert "no token labelled 'no-such-token'" in log and "tokens present: keyward" in log
    assert "Traceback" not in log


def test_a_key_that_does_not_exist_yet_is_reported_in_status_then_served_once_created(start_plugin, keyward):
    plugin = start_plugin(key_name="later")
    with KmsClient(plugin.socket_path) as kms:
        status = kms.status()
        assert status.healthz != "ok" and "key 'later' does not exist" in status.healthz
        keyward("keys", "create", "later")
        wait_for(lambda: kms.status().healthz == "ok", timeout=10, what="ok once the key exists")
        assert kms.status().key_id.startswith("later/v1/")


def test_the_plugin_can_be_started_as_a_module_too(short_tmp, token):
    env = {**os.environ, **token.env()}
    sock = short_tmp / "m.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kmsplugin", "--socket", str(sock)], env=env, stderr=subprocess.DEVNULL
    )
    try:
        wait_for(lambda: socket_accepts(sock), timeout=20, what="python -m kmsplugin to listen")
        with KmsClient(sock) as kms:
            assert kms.status().healthz == "ok"
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0


def test_a_configured_group_gets_a_0660_socket_it_owns(short_tmp, token):
    import grp

    plugin = localcluster.Plugin(
        short_tmp / "g", token, short_tmp / "g.sock", extra_args=["--socket-group", "daemon"]
    )
    plugin.start()
    try:
        st = plugin.socket_path.stat()
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == grp.getgrnam("daemon").gr_gid
    finally:
        plugin.stop()


def test_after_rotate_then_disable_of_the_reported_version_encrypt_uses_the_new_primary(
    start_plugin, keyward
):
    plugin = start_plugin()
    with KmsClient(plugin.socket_path) as kms:
        reported = kms.status().key_id
        keyward("keys", "rotate", "secrets")
        keyward("keys", "disable", "secrets", "1")
        time.sleep(2.5)  # past the plugin's manifest refresh, before its next Status
        sealed = kms.encrypt(b"e" * 32)
        assert sealed.key_id != reported and sealed.key_id.startswith("secrets/v2/")


def check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(KEYWARD), "plugin", "check", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_plugin_check_the_probe_command_answers_while_the_plugin_serves_and_fails_clearly_otherwise(
    start_plugin, keyward, token, short_tmp
):
    listed = json.loads(keyward("keys", "list", "--json").stdout)
    plugin = start_plugin()
    ok = check("--socket", str(plugin.socket_path), "--require-healthy")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == f"healthz=ok version=v2 key_id={listed[0]['primaryKeyId']}"

    # An HSM problem is reported but is no reason for a liveness probe to restart the plugin.
    real_pin = token.pin_file.read_text()
    token.pin_file.write_text("000000")
    unhealthy = start_plugin(name="wrong-pin")
    try:
        alive = check("--socket", str(unhealthy.socket_path))
        assert alive.returncode == 0 and "incorrect PIN" in alive.stdout, alive.stdout + alive.stderr
        strict = check("--socket", str(unhealthy.socket_path), "--require-healthy")
        assert strict.returncode == 1 and "not healthy" in strict.stderr and "incorrect PIN" in strict.stderr
    finally:
        token.pin_file.write_text(real_pin)

    missing = short_tmp / "nothing.sock"
    gone = check("--socket", str(missing), "--timeout", "2")
    assert gone.returncode == 1
    assert f"unix://{missing}" in gone.stderr and "is the plugin running" in gone.stderr
    assert "Traceback" not in gone.stderr
