"""Where the PKCS#11 module, the token and the PIN come from.

Settings come from command-line flags or environment variables (``KEYWARD_PKCS11_MODULE``,
``KEYWARD_TOKEN_LABEL``, ``KEYWARD_PIN_FILE``, ``KEYWARD_PIN``). The PIN is read from a file or an
environment variable, never from a flag (flags show in ``ps``), and is never logged or put in an error.
A file is preferred: it can be a mounted Secret or a root-only file on a control-plane node, so the plugin
needs nothing from the apiserver it serves.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
from collections.abc import Mapping

from keyward.hsm import errors

DEFAULT_TOKEN_LABEL = "keyward"  # noqa: S105 (a token label, not a secret)


@dataclasses.dataclass(frozen=True)
class HsmConfig:
    module_path: pathlib.Path
    token_label: str
    pin_file: pathlib.Path | None = None
    pin_env: str | None = None  # name of the environment variable holding the PIN

    def read_pin(self, environ: Mapping[str, str] | None = None) -> str:
        """Returns the PIN, or raises ConfigurationError naming the source that failed."""
        env = os.environ if environ is None else environ
        if self.pin_file is not None:
            try:
                pin = self.pin_file.read_text().strip()
            except OSError as exc:
                raise errors.ConfigurationError(
                    f"cannot read the PIN file {self.pin_file}: {exc.strerror}; "
                    "check the path and that this process may read it"
                ) from None
            if not pin:
                raise errors.ConfigurationError(f"the PIN file {self.pin_file} is empty")
            return pin
        if self.pin_env is not None:
            pin = env.get(self.pin_env, "")
            if not pin:
                raise errors.ConfigurationError(f"environment variable {self.pin_env} is empty")
            return pin
        raise errors.ConfigurationError(
            "no PIN source configured: use --pin-file or KEYWARD_PIN_FILE (preferred), or KEYWARD_PIN"
        )

    def pin_fingerprint(self) -> tuple[float, int] | None:
        """Cheap change detector for the PIN file (mtime, size), so a fixed PIN is picked up."""
        if self.pin_file is None:
            return None
        try:
            st = self.pin_file.stat()
        except OSError:
            return None
        return (st.st_mtime, st.st_size)

    def check(self) -> None:
        """Fails early, with a clear message, when the module file is missing."""
        if not self.module_path.is_file():
            raise errors.ConfigurationError(
                f"PKCS#11 module {self.module_path} does not exist; set KEYWARD_PKCS11_MODULE or "
                "--pkcs11-module to the HSM vendor's library (SoftHSM2: /usr/lib/softhsm/libsofthsm2.so)"
            )


def from_settings(
    *,
    module_path: str | None = None,
    token_label: str | None = None,
    pin_file: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> HsmConfig:
    """Builds the settings from explicit values, falling back to the environment."""
    env = os.environ if environ is None else environ
    module = module_path or env.get("KEYWARD_PKCS11_MODULE")
    if not module:
        raise errors.ConfigurationError(
            "no PKCS#11 module configured: set KEYWARD_PKCS11_MODULE or --pkcs11-module"
        )
    label = token_label or env.get("KEYWARD_TOKEN_LABEL") or DEFAULT_TOKEN_LABEL
    pin_path = pin_file or env.get("KEYWARD_PIN_FILE")
    return HsmConfig(
        module_path=pathlib.Path(module),
        token_label=label,
        pin_file=pathlib.Path(pin_path) if pin_path else None,
        pin_env=None if pin_path else ("KEYWARD_PIN" if env.get("KEYWARD_PIN") else None),
    )


def add_arguments(parser: argparse.ArgumentParser, *, suppress_defaults: bool = False) -> None:
    """The PKCS#11 flags every Keyward command shares. There is deliberately no --pin flag.

    ``suppress_defaults`` is for subcommands that repeat the flags, so that a flag given before the
    subcommand is not reset by the subcommand's default.
    """
    default = argparse.SUPPRESS if suppress_defaults else None
    parser.add_argument(
        "--pkcs11-module", default=default, help="PKCS#11 module path (env KEYWARD_PKCS11_MODULE)"
    )
    parser.add_argument(
        "--token-label", default=default, help="token label (env KEYWARD_TOKEN_LABEL, default 'keyward')"
    )
    parser.add_argument(
        "--pin-file", default=default, help="file holding the user PIN (env KEYWARD_PIN_FILE, or KEYWARD_PIN)"
    )


def from_args(args: argparse.Namespace) -> HsmConfig:
    return from_settings(module_path=args.pkcs11_module, token_label=args.token_label, pin_file=args.pin_file)
