"""The worker: processes inbox events, fires due timers and dispatches the outbox, in a loop."""
from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

from bot.logs import unit_of_work
from recovery import heartbeats, inbox, limits

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, *, db, recovery, dispatcher, handler, clock, idle_sleep: float = 0.2):
        self.db, self.recovery, self.dispatcher = db, recovery, dispatcher
        self.handler, self.clock, self.idle_sleep = handler, clock, idle_sleep
        self.stop_event = threading.Event()
        self.wake_event = threading.Event()
        self._pruned_at = None
        self.worker_id = heartbeats.new_worker_id()
        self.started_at = clock.now()
        self._beat_at = None
        self.last_pass = None  # time.monotonic() of the last finished pass, for the worker's /healthz

    def wake(self) -> None:
        """Called by a route that stored an event in this process (`recoverybot serve`), so the
        worker need not sleep out its idle interval before answering."""
        self.wake_event.set()

    def _housekeeping(self) -> None:
        """Say this worker is alive, now and then; and drop attempt counters older than a day, which
        can limit nothing."""
        now = self.clock.now()
        if self._beat_at is None or now - self._beat_at >= heartbeats.INTERVAL:
            with self.db.transaction() as session:
                heartbeats.beat(session, self.worker_id, now=now, started_at=self.started_at)
            self._beat_at = now
        if self._pruned_at is None or now - self._pruned_at >= timedelta(minutes=10):
            with self.db.transaction() as session:
                limits.prune(session, now=now)
            self._pruned_at = now

    def run_once(self, batch: int = 50, inbox_batch: int = 10) -> int:
        """One pass over the three queues; returns how many items were handled.

        The inbox batch is small so replies go out soon after their message, not after a long backlog.
        """
        done = 0
        for _ in range(inbox_batch):
            with unit_of_work():
                if not inbox.process_one(self.db, self.handler, self.clock.now):
                    break
            done += 1
        for _ in range(batch):
            with unit_of_work():
                if not self.recovery.fire_due_timer():
                    break
            done += 1
        with unit_of_work():
            done += self.dispatcher.run_once(batch)
        self._housekeeping()
        self.last_pass = time.monotonic()
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

    def healthy(self, within: float = 60.0) -> bool:
        """Whether the loop finished a pass lately (a pass stuck on a hung call is not healthy)."""
        return self.last_pass is not None and time.monotonic() - self.last_pass < within

    def stop(self) -> None:
        self.stop_event.set()
        self.wake_event.set()
