"""The worker: processes inbox events, fires due timers and dispatches the outbox, in a loop."""
from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

from bot.logs import unit_of_work
from recovery import heartbeats, inbox, limits, retention as retention_mod
from recovery.outbox import EMAIL_LANE, OTHER_LANE

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, *, db, recovery, dispatcher, handler, clock, idle_sleep: float = 0.2, retention=None):
        self.db, self.recovery, self.dispatcher = db, recovery, dispatcher
        self.handler, self.clock, self.idle_sleep = handler, clock, idle_sleep
        self.retention = retention  # when given, the worker purges what is past it once a day
        self.stop_event = threading.Event()
        self.wake_event = threading.Event()
        self.mail_wake = threading.Event()
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
        """Now and then: say this worker is alive; drop attempt counters older than a day (they can limit
        nothing); and run the daily purge when it is due (any worker may; the first to claim the day does)."""
        now = self.clock.now()
        if self._beat_at is None or now - self._beat_at >= heartbeats.INTERVAL:
            with self.db.transaction() as session:
                heartbeats.beat(session, self.worker_id, now=now, started_at=self.started_at)
            self._beat_at = now
        if self._pruned_at is None or now - self._pruned_at >= timedelta(minutes=10):
            self._pruned_at = now
            with self.db.transaction() as session:
                limits.prune(session, now=now)
            if self.retention is not None:
                result = retention_mod.purge_if_due(self.db, self.retention, now)
                if result is not None:
                    log.info("daily purge: %s", ", ".join(f"{k} {n}" for k, n in result.counts.items()))

    def run_once(self, batch: int = 50, inbox_batch: int = 10, lane=None) -> int:
        """One pass over the three queues; returns how many items were handled. `lane` limits which
        outbox messages this pass sends (run_forever sends email from a loop of its own).

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
            done += self.dispatcher.run_once(batch, lane)
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
        """Inbox, timers and chat or staff messages in this loop; email in a loop of its own, so an
        email (a slow SMTP server, or the two emails a case start writes) never delays a chat reply,
        and reply timing says nothing about whether an address has an account."""
        log.info("worker started")
        mail = threading.Thread(target=self._loop, args=(self._mail_pass, self.mail_wake), name="worker-mail",
                                daemon=True)
        mail.start()
        self._loop(self._main_pass, self.wake_event)
        mail.join(timeout=10)
        log.info("worker stopped")

    def _main_pass(self) -> int:
        done = self.run_once(lane=OTHER_LANE)
        if done:
            self.mail_wake.set()  # whatever this pass did may have written email
        return done

    def _mail_pass(self) -> int:
        with unit_of_work():
            return self.dispatcher.run_once(50, EMAIL_LANE)

    def _loop(self, one_pass, wake: threading.Event) -> None:
        while not self.stop_event.is_set():
            try:
                busy = one_pass()
            except Exception:  # noqa: BLE001 - e.g. the database restarting; try again shortly
                log.exception("worker pass failed; retrying")
                busy = 0
                self.stop_event.wait(2.0)
            if not busy:
                wake.wait(self.idle_sleep)
                wake.clear()

    def healthy(self, within: float = 60.0) -> bool:
        """Whether the loop finished a pass lately (a pass stuck on a hung call is not healthy)."""
        return self.last_pass is not None and time.monotonic() - self.last_pass < within

    def stop(self) -> None:
        self.stop_event.set()
        self.wake_event.set()
        self.mail_wake.set()
