"""What `make up`, `make -s env`, `make demo` and `make down` run, on a state folder of the test's own."""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import tempfile

import pytest

pytestmark = pytest.mark.e2e
REPO = pathlib.Path(__file__).resolve().parents[2]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300, env=env, check=False
    )


def test_up_env_demo_down_give_a_user_a_working_encrypted_cluster_and_clean_up():
    state = pathlib.Path(tempfile.mkdtemp(prefix="kwm-", dir="/tmp")) / "cluster"
    try:
        up = run("hack/localcluster.py", "up", "--state", str(state))
        assert up.returncode == 0, up.stdout + up.stderr
        again = run("hack/localcluster.py", "up", "--state", str(state))
        assert again.returncode == 0 and "already up" in again.stdout + again.stderr

        env_out = run("hack/localcluster.py", "env", "--state", str(state))
        assert env_out.returncode == 0, env_out.stderr
        exports = dict(
            shlex.split(line.removeprefix("export "))[0].split("=", 1)
            for line in env_out.stdout.splitlines()
            if line.startswith("export ") and "PATH=" not in line[:12]
        )
        for name in (
            "KUBECONFIG",
            "KEYWARD_ETCD_ENDPOINTS",
            "KEYWARD_ETCD_CACERT",
            "KEYWARD_ETCD_CERT",
            "KEYWARD_ETCD_KEY",
            "SOFTHSM2_CONF",
            "KEYWARD_KMS_SOCKET",
        ):
            assert exports.get(name), f"{name} missing from `make -s env`"
        # The exports alone (PATH included) let the keyward CLI reach the token the plugin serves.
        clean_env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYWARD_", "SOFTHSM2"))}
        clean_env["PATH"] = "/usr/local/bin:/usr/bin:/bin"
        env_cmd = f"{shlex.quote(sys.executable)} hack/localcluster.py env --state {state}"

        def with_exports(command: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                ["bash", "-c", f'eval "$({env_cmd})" && {command}'],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=60,
                env=clean_env,
                check=False,
            )

        listed = with_exports("keyward keys list")
        assert listed.returncode == 0 and "secrets" in listed.stdout, listed.stderr

        demo = run("hack/demo.py", "--state", str(state))
        assert demo.returncode == 0, demo.stdout + demo.stderr
        assert '"proof": true' in demo.stdout
        # make up installs the operator too: the served key is an EncryptionKey, Ready, with the same key_id.
        key_id = json.loads(demo.stdout.splitlines()[-1])["key_id"]
        rows = [line.split() for line in demo.stdout.splitlines() if line.startswith("secrets ")]
        assert any(row[2] == "True" and row[-1] == key_id for row in rows), (
            rows
        )  # NAME PRIMARY READY ... KEY ID
        assert "[FAILED]" not in demo.stdout and "k8s:enc:kms:v2:keyward:" in demo.stdout

        inspect = with_exports("python hack/etcd-inspect.py")
        assert inspect.returncode == 0, inspect.stderr
        demo_row = next(line for line in inspect.stdout.splitlines() if "/default/keyward-demo" in line)
        assert "kms-v2" in demo_row and "keyward" in demo_row and "secrets/v1/" in demo_row
    finally:
        down = run("hack/localcluster.py", "down", "--state", str(state))
        shutil.rmtree(state.parent, ignore_errors=True)
    assert down.returncode == 0, down.stderr
    assert not state.exists()
    assert run("hack/localcluster.py", "env", "--state", str(state)).returncode == 1
