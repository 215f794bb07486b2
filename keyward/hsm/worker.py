"""The one thread in a process that talks to the PKCS#11 module.

python-pkcs11 initialises the module with ``C_Initialize(NULL)``, which tells it that the application will
not call it from several threads, and SoftHSM2 crashes the process when two threads use it at once
(shared/reference/pkcs11-notes.md). So every call into the module, from loading it to logging in to each
encrypt, runs on this worker's single thread; other threads submit work and wait with a deadline. For more
throughput against a slow network HSM, run several processes, each with its own worker.

The thread is process-wide, shared by every HsmWorker in the process: python-pkcs11 loads a module once per
process (``pkcs11.lib`` is a singleton) and the login belongs to the token, so two workers with two threads
would be two threads in the same module. This executor is the one piece of module-level state in Keyward,
and it mirrors state the PKCS#11 module itself keeps per process.

Each worker owns a session and its login:

- The PIN is read when a session is opened. If the token refuses it, the failure is remembered and raised
  again on every call *without* asking the token, so nothing ever loops on a wrong PIN (HSMs lock or wipe
  tokens after repeated failures). Only a change of the PIN file lets the worker try again.
- A session that goes stale (token re-inserted, HSM restarted, idle time-out) is dropped, opened again and
  the call retried once; cached key handles are dropped with it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import pkcs11
import pkcs11.exceptions as p11e
from pkcs11 import Attribute, ObjectClass

from keyward.hsm import config as hsm_config
from keyward.hsm import errors

T = TypeVar("T")
_log = logging.getLogger("keyward.hsm")

_thread_lock = threading.Lock()
_thread: concurrent.futures.ThreadPoolExecutor | None = None


def _pkcs11_thread() -> concurrent.futures.ThreadPoolExecutor:
    """The process's single PKCS#11 thread, created on first use."""
    global _thread  # noqa: PLW0603 (process-wide by nature; see the module docstring)
    with _thread_lock:
        if _thread is None:
            _thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="pkcs11")
        return _thread


# Failures after which a fresh session may succeed.
_SESSION_ERRORS: tuple[type[Exception], ...] = (
    p11e.SessionHandleInvalid,
    p11e.SessionClosed,
    p11e.DeviceRemoved,
    p11e.TokenNotPresent,
    p11e.TokenNotRecognised,
    p11e.UserNotLoggedIn,
    p11e.ObjectHandleInvalid,
    p11e.KeyHandleInvalid,
    p11e.DeviceError,
)
_LOGIN_ERRORS: dict[type[Exception], str] = {
    p11e.PinIncorrect: "the token refused the PIN (incorrect PIN)",
    p11e.PinLocked: "the token's user PIN is locked; an HSM administrator must unlock it",
    p11e.PinExpired: "the token's user PIN has expired; set a new one",
    p11e.PinLenRange: "the PIN has a length the token does not accept",
    p11e.PinInvalid: "the PIN contains characters the token does not accept",
}


class HsmWorker:
    """Runs functions of a logged-in PKCS#11 session on one dedicated thread."""

    def __init__(self, cfg: hsm_config.HsmConfig, *, default_timeout: float = 5.0) -> None:
        self.config = cfg
        self.default_timeout = default_timeout
        self._executor = _pkcs11_thread()
        # Everything below is touched only on the worker thread.
        self._lib: Any = None
        self._token: Any = None
        self._session: Any = None
        self._handles: dict[bytes, Any] = {}
        self._login_failure: tuple[tuple[float, int] | None, errors.LoginError] | None = None
        self._closed = threading.Event()

    # -- public API, any thread ---------------------------------------------------------------------------

    def run(self, fn: Callable[[Any], T], *, timeout: float | None = None) -> T:
        """Calls ``fn(session)`` on the worker thread and returns its result.

        Raises HsmUnavailable when the call does not finish in time (the worker finishes it later; calls
        queued behind it wait), and the StoreError the call raised otherwise.
        """
        if self._closed.is_set():
            raise errors.HsmUnavailable("the HSM connection is closed (the process is shutting down)")
        future = self._executor.submit(self._call, fn)
        limit = self.default_timeout if timeout is None else timeout
        try:
            return future.result(timeout=limit)
        except concurrent.futures.TimeoutError:
            raise errors.HsmUnavailable(f"the HSM did not answer within {limit:g}s") from None

    def key(self, session: Any, object_id: bytes) -> Any:
        """Returns the secret key object with this CKA_ID (worker thread only; handles are cached)."""
        handle = self._handles.get(object_id)
        if handle is None:
            try:
                handle = session.get_key(object_class=ObjectClass.SECRET_KEY, id=object_id)
            except p11e.NoSuchKey:
                raise errors.KeyNotFoundError(
                    f"the key object with id {object_id.hex()} is not in the token"
                ) from None
            except p11e.MultipleObjectsReturned:
                raise errors.StoreError(
                    f"the token holds several key objects with id {object_id.hex()}; "
                    "remove the duplicates with the HSM's tools"
                ) from None
            self._handles[object_id] = handle
        return handle

    def forget_key(self, object_id: bytes) -> None:
        """Drops a cached handle (worker thread only), e.g. after the object was destroyed."""
        self._handles.pop(object_id, None)

    def close(self) -> None:
        if self._closed.is_set():
            return
        with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
            self._executor.submit(self._drop_session).result(timeout=self.default_timeout)
        self._closed.set()

    # -- worker thread -----------------------------------------------------------------------------------

    def _call(self, fn: Callable[[Any], T]) -> T:
        for attempt in (1, 2):
            try:
                session = self._ensure_session()
            except p11e.PKCS11Error as exc:
                # Not one of the failures _ensure_session translates (the token vanished mid-call, the
                # module answered with a generic error): forget the token so the next call looks it up.
                self._drop_session()
                self._token = None
                raise errors.HsmUnavailable(
                    f"the token is not usable right now ({type(exc).__name__})"
                ) from exc
            try:
                return fn(session)
            except _SESSION_ERRORS as exc:
                self._drop_session()
                if attempt == 2:
                    raise errors.HsmUnavailable(f"the HSM failed twice with {type(exc).__name__}") from exc
                _log.warning("pkcs11.session_reset", extra={"fields": {"reason": type(exc).__name__}})
            except p11e.PKCS11Error as exc:
                raise errors.HsmUnavailable(f"the HSM returned {type(exc).__name__}") from exc
        raise AssertionError("unreachable")

    def _ensure_session(self) -> Any:
        if self._session is not None:
            return self._session
        if self._login_failure is not None:
            fingerprint, failure = self._login_failure
            if fingerprint is None or fingerprint == self.config.pin_fingerprint():
                raise failure
            self._login_failure = None  # the PIN file changed: one new attempt is allowed
        token = self._ensure_token()
        pin = self.config.read_pin()
        try:
            self._session = token.open(user_pin=pin, rw=True)
        except tuple(_LOGIN_ERRORS) as exc:
            reason = _LOGIN_ERRORS[type(exc)]
            failure = errors.LoginError(
                f"login to token {self.config.token_label!r} failed: {reason}. Keyward does not retry a "
                "refused PIN (tokens lock after repeated failures); fix the PIN (a running plugin re-reads "
                "its PIN file when the file changes)"
            )
            self._login_failure = (self.config.pin_fingerprint(), failure)
            _log.error(
                "pkcs11.login_failed", extra={"fields": {"token": self.config.token_label, "reason": reason}}
            )
            raise failure from None
        except p11e.UserAlreadyLoggedIn:
            # Another session of this process is logged in; a session without a PIN shares that login.
            self._session = token.open(rw=True)
        except p11e.PKCS11Error as exc:
            self._token = None
            raise errors.HsmUnavailable(f"cannot open a session on the token ({type(exc).__name__})") from exc
        _log.info("pkcs11.session_opened", extra={"fields": {"token": self.config.token_label}})
        return self._session

    def _ensure_token(self) -> Any:
        if self._token is not None:
            return self._token
        if self._lib is None:
            self.config.check()
            try:
                self._lib = pkcs11.lib(str(self.config.module_path))
            except (OSError, RuntimeError) as exc:
                raise errors.ConfigurationError(
                    f"cannot load the PKCS#11 module {self.config.module_path}: {exc}"
                ) from None
        try:
            self._token = self._lib.get_token(token_label=self.config.token_label)
        except p11e.NoSuchToken:
            labels = sorted(
                {slot.get_token().label for slot in self._lib.get_slots(token_present=True)} - {""}
            )
            raise errors.ConfigurationError(
                f"no token labelled {self.config.token_label!r} in {self.config.module_path} "
                f"(tokens present: {', '.join(labels) or 'none'}); set KEYWARD_TOKEN_LABEL or "
                "initialise the token"
            ) from None
        except p11e.MultipleTokensReturned:
            raise errors.ConfigurationError(
                f"several tokens are labelled {self.config.token_label!r}; give each a unique label"
            ) from None
        return self._token

    def _drop_session(self) -> None:
        self._handles.clear()
        session, self._session = self._session, None
        if session is not None:
            with contextlib.suppress(p11e.PKCS11Error):
                session.close()


# Attribute templates used by the store; kept here so everything PKCS#11-specific sits in two modules.
SECRET_KEY_TEMPLATE: dict[Any, Any] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.ENCRYPT: True,
    Attribute.DECRYPT: True,
    Attribute.WRAP: False,
    Attribute.UNWRAP: False,
    Attribute.SIGN: False,
    Attribute.VERIFY: False,
    Attribute.DERIVE: False,
    Attribute.MODIFIABLE: False,
}
