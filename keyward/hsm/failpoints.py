"""Named crash points for crash-consistency tests, off unless KEYWARD_FAILPOINTS names them.

A test sets ``KEYWARD_FAILPOINTS=store.after-generate`` on a process to make it die (``os._exit``, no
clean-up, like a SIGKILL) at exactly that point of a multi-step change, then checks that the next run
completes the change once. Nothing else reads this variable; in production it is unset and each hit is one
environment lookup.
"""

from __future__ import annotations

import os
import sys

EXIT_CODE = 86


def hit(name: str) -> None:
    armed = os.environ.get("KEYWARD_FAILPOINTS", "")
    if armed and name in armed.split(","):
        sys.stderr.write(f"keyward: failpoint {name} reached, exiting\n")
        sys.stderr.flush()
        os._exit(EXIT_CODE)
