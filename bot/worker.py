"""The worker: processes inbox events, fires due timers and dispatches the outbox, in a loop."""
from __future__ import annotations

import logging
import threading
from datetime import timedelta

from recovery import inbox, limits, retention as retention_mod

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, *, db, recovery, dispatcher, handler, clock, idle_sleep: float = 0.2, retention=None):
        self.db, self.recovery, self.dispatcher = db, recovery, dispatcher
        self.handler, self.clock, self.idle_sleep = handler, clock, idle_sleep
        self.retention = retention  # when given, the worker purges what is past it once a day
        self.stop_event = threading.Event()
        self.wake_event = threading.Event()
        self._pruned_at = None

    def wake(self) -> None:
        """Called by a route that stored an event in this process (`recoverybot serve`), so the
        worker need not sleep out its idle interval before answering."""
        self.wake_event.set()

    def _housekeeping(self) -> None:
        """Now and then: drop attempt counters older than a day (they can limit nothing), and run the
        daily purge when it is due (any worker may; the first to claim the day does)."""
        now = self.clock.now()
        if self._pruned_at is None or now - self._pruned_at >= timedelta(minutes=10):
            self._pruned_at = now
            with self.db.transaction() as session:
                limits.prune(session, now=now)
            if self.retention is not None:
                result = retention_mod.purge_if_due(self.db, self.retention, now)
                if result is not None:
                    log.info("daily purge: %s", ", ".join(f"{k} {n}" for k, n in result.counts.items()))

    def run_once(self, batch: int = 50, inbox_batch: int = 10) -> int:
        """One pass over the three queues; returns how many items were handled.

        The inbox batch is small so replies go out soon after their message, not after a long backlog.
        """
        done = 0
        for _ in range(inbox_batch):
            if not inbox.process_one(self.db, self.handler, self.clock.now):
                break
            done += 1
        for _ in range(batch):
            if not self.recovery.fire_due_timer():
                break
            done += 1
        done += self.dispatcher.run_once(batch)
        self._housekeeping()
        return done

    def drain(self, max_passes: int = 100) -> int:
        """Run passes until nothing is left that is due now (tests and the CLI use this)."""
        total = 0
        for _ in range(max_passes):
            n = self.run_once()
            total += n
            if n == 0:
                break
        return total

    def run_forever(self) -> None:
        log.info("worker started")
        while not self.stop_event.is_set():
            try:
                busy = self.run_once()
            except Exception:  # noqa: BLE001 - e.g. the database restarting; try again shortly
                log.exception("worker pass failed; retrying")
                busy = 0
                self.stop_event.wait(2.0)
            if not busy:
                self.wake_event.wait(self.idle_sleep)
                self.wake_event.clear()
        log.info("worker stopped")

    def stop(self) -> None:
        self.stop_event.set()
        self.wake_event.set()
