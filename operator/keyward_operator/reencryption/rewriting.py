"""The rewrite loop of a re-encryption: page through each resource and send every object its no-op write.

Memory stays flat: one page of object names (metadata only) is held at a time. Writes go out from a few
threads, all under one rate limit. After each page the counts and the next continue token are handed to
``on_page``, which persists them: a restarted operator continues from the last persisted page, and
re-sending the writes of a page that was in flight is harmless (an object already under the target version
is not written again). An expired continue token restarts the list where etcd says it may, or from the
start; again, objects already rewritten cost one cheap no-op each.

Per object: 2xx counts as rewritten (new resourceVersion) or unchanged; 409 and 404 are someone else's
newer write or delete; 403, 429, 5xx and transport errors are retried with backoff (an apiserver that is
restarting), and if they persist the page is abandoned uncounted and redone later; anything else, or a 403
that persists, is a failure and named in the run's ``failedObjects``.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Callable

from keyward_operator import kubehttp
from keyward_operator.reencryption import objects, ratelimit, record

_log = logging.getLogger("keyward.operator")
# 403 too: an apiserver that just started refuses requests until its RBAC cache has filled.
RETRYABLE = {403, 429, 500, 502, 503, 504}


class Interrupted(Exception):
    """The run was told to stop (operator shutdown, key deleted, or a newer primary) mid-way."""


class Unavailable(Exception):
    """The apiserver kept failing writes in ways that pass (restart, overload): the page is redone later."""


class Rewriter:
    def __init__(
        self,
        objects_api: objects.Objects,
        *,
        rate: float,
        workers: int = 4,
        page_size: int = 500,
        attempts: int = 6,
        backoff: float = 0.25,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.objects = objects_api
        self.limiter = ratelimit.RateLimiter(rate)
        self.workers = workers
        self.page_size = page_size
        self.attempts = attempts
        self.backoff = backoff
        self.sleep = sleep

    def run(
        self,
        run: record.Run,
        *,
        should_stop: Callable[[], bool],
        on_page: Callable[[], None],
    ) -> None:
        """Rewrites what ``run`` has not finished yet; raises Interrupted, ResourceError or ListError."""
        with concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="rewrite") as pool:
            for progress in run.resources:
                if progress.done:
                    continue
                rtype = self.objects.resolve(progress.resource)
                while not progress.done:
                    if should_stop():
                        raise Interrupted()
                    page = self._page(rtype, progress)
                    if page is None:
                        continue
                    results = list(
                        pool.map(
                            self._rewrite,
                            [rtype] * len(page.items),
                            page.items,
                            [should_stop] * len(page.items),
                        )
                    )
                    if should_stop():
                        raise Interrupted()  # this page's counts are not kept: it is redone on resume
                    stuck = [detail for outcome, detail in results if outcome == "unavailable"]
                    if stuck:
                        raise Unavailable(f"{progress.resource}: {stuck[0]}")
                    for ref, (outcome, detail) in zip(page.items, results, strict=True):
                        progress.seen += 1
                        setattr(progress, outcome, getattr(progress, outcome) + 1)
                        if outcome == "failures":
                            run.note_failure(f"{progress.resource} {ref}: {detail}")
                    progress.continue_token = page.continue_token
                    progress.done = page.continue_token is None
                    on_page()

    def _page(self, rtype: objects.ResourceType, progress: record.ResourceProgress) -> objects.Page | None:
        for attempt in range(self.attempts):
            try:
                return self.objects.list_page(
                    rtype, limit=self.page_size, continue_token=progress.continue_token
                )
            except objects.ContinueExpired as exc:
                progress.relists += 1
                progress.continue_token = exc.restart_token
                _log.info(
                    "reencrypt.relist",
                    extra={
                        "fields": {"resource": progress.resource, "resumed": exc.restart_token is not None}
                    },
                )
                return None
            except (objects.ListError, kubehttp.TransportError):
                if attempt == self.attempts - 1:
                    raise
                self.sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def _rewrite(
        self, rtype: objects.ResourceType, ref: objects.ObjectRef, should_stop: Callable[[], bool]
    ) -> tuple[str, str]:
        detail = ""
        for attempt in range(self.attempts):
            if should_stop():
                return "failures", "interrupted"
            self.limiter.acquire()
            try:
                response = self.objects.rewrite(rtype, ref)
            except kubehttp.TransportError as exc:
                detail = str(exc)
            else:
                outcome, detail = _classify(response, ref)
                if outcome:
                    return outcome, detail
            if attempt < self.attempts - 1:
                self.sleep(self.backoff * 2**attempt)
        if detail.startswith("HTTP 403"):
            return "failures", detail  # still refused once the apiserver had time to settle: RBAC
        return "unavailable", f"gave up after {self.attempts} attempts: {detail}"


def _classify(response: kubehttp.Response, ref: objects.ObjectRef) -> tuple[str, str]:
    """The outcome of one no-op write, or "" with the detail when it is worth trying again."""
    if 200 <= response.status < 300:
        new_rv = objects.new_resource_version(response)
        return ("unchanged" if new_rv == ref.resource_version else "rewritten"), ""
    outcomes = {409: "conflicts", 404: "deleted"}
    if response.status in outcomes:
        return outcomes[response.status], ""
    detail = f"HTTP {response.status}: {response.message()}"
    return ("" if response.status in RETRYABLE else "failures"), detail
