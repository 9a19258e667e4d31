"""The worker: processes inbox events, fires due timers and dispatches the outbox, in a loop."""
from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

from bot import wakeup
from bot.logs import unit_of_work
from recovery import heartbeats, inbox, limits, retention as retention_mod
from recovery.outbox import APPROVER_LANE, EMAIL_LANE, OTHER_LANE

log = logging.getLogger(__name__)
# After a failed pass (the database restarting, say), try again soon: leases it gave back and messages
# stored meanwhile should not wait long. The wait doubles while passes keep failing, up to the cap.
RETRY_FIRST, RETRY_CAP = 0.1, 1.0


class Worker:
    def __init__(self, *, db, recovery, dispatcher, handler, clock, idle_sleep: float = 0.2, retention=None,
                 listen: bool = True):
        self.db, self.recovery, self.dispatcher = db, recovery, dispatcher
        self.handler, self.clock, self.idle_sleep = handler, clock, idle_sleep
        self.listen = listen  # on PostgreSQL, wake on other processes' NOTIFY (bot/wakeup.py)
        self.retention = retention  # when given, the worker purges what is past it once a day
        self.stop_event = threading.Event()
        self.wake_event = threading.Event()
        self.mail_wake = threading.Event()
        self._pruned_at = None
        self.worker_id = heartbeats.new_worker_id()
        self.started_at = clock.now()
        self._beat_at = None
        self.last_pass = None  # time.monotonic() of the last finished pass, for the worker's /healthz
        self.last_pass_full = False  # whether a queue filled its batch in the last pass: more may wait
        self._looked_at = None  # time.monotonic() of run_forever's last look at timers and the outbox
        self._outbox_hint = False  # outbox messages were stored since the outbox was last looked at
        self._hint_lock = threading.Lock()

    def wake(self) -> None:
        """Called by a route that stored an event in this process (`recoverybot serve`), so the
        worker need not sleep out its idle interval before answering."""
        self.wake_event.set()

    def _notified(self, what: str) -> None:
        """Another process stored work (bot/wakeup.py): email wakes the mail loop, the rest the main one,
        and a reconnect (after which anything may have been missed) wakes both for a full look."""
        if what == wakeup.ANY:
            self._looked_at = None
        self.stored({what})

    def stored(self, kinds: set) -> None:
        """Work was stored, by a transaction of this process that committed (bot/wiring.py) or of another
        one (its NOTIFY)."""
        if kinds & {wakeup.OUTBOX, wakeup.ANY}:
            with self._hint_lock:
                self._outbox_hint = True
        if kinds - {wakeup.EMAIL}:
            self.wake_event.set()
        if kinds & {wakeup.EMAIL, wakeup.ANY}:
            self.mail_wake.set()

    def _take_outbox_hint(self) -> bool:
        with self._hint_lock:
            hinted, self._outbox_hint = self._outbox_hint, False
        return hinted

    def beat(self, now=None) -> None:
        """Say this worker is alive (what the web process's /readyz reads)."""
        now = now or self.clock.now()
        with self.db.transaction() as session:
            heartbeats.beat(session, self.worker_id, now=now, started_at=self.started_at)
        self._beat_at = now

    def _housekeeping(self) -> None:
        """Now and then: say this worker is alive; drop attempt counters older than a day (they can limit
        nothing); and run the daily purge when it is due (any worker may; the first to claim the day does)."""
        now = self.clock.now()
        if self._beat_at is None or now - self._beat_at >= heartbeats.INTERVAL:
            self.beat(now)
        if self._pruned_at is None or now - self._pruned_at >= timedelta(minutes=10):
            self._pruned_at = now
            with self.db.transaction() as session:
                limits.prune(session, now=now)
            if self.retention is not None:
                result = retention_mod.purge_if_due(self.db, self.retention, now)
                if result is not None:
                    log.info("daily purge: %s", ", ".join(f"{k} {n}" for k, n in result.counts.items()))

    def run_once(self, batch: int = 50, inbox_batch: int = 10, lane=None, *, look_all: bool = True) -> int:
        """One pass over the three queues; returns how many items were handled. `lane` limits which
        outbox messages this pass sends (run_forever sends email from a loop of its own).

        The inbox batch is small so replies go out soon after their message, not after a long backlog; and
        what those events owe an approver (the outcome of a decision) goes out before timers and the rest
        of the outbox.

        With `look_all` false (run_forever, between its regular looks) the pass looks at the inbox, and at
        the outbox only when messages were stored since its last look; timers and retries that come due
        wait for the next regular look.
        """
        done, full = 0, False
        for _ in range(inbox_batch):
            with unit_of_work():
                if not inbox.process_one(self.db, self.handler, self.clock.now):
                    break
            done += 1
        else:
            full = True
        # taken before sending, so what is stored from here on is seen by this pass or the next
        outbox = self._take_outbox_hint() or look_all
        if done and lane in (None, OTHER_LANE) and outbox:
            with unit_of_work():
                sent = self.dispatcher.run_once(batch, APPROVER_LANE)
            done, full = done + sent, full or sent >= batch
        if look_all:
            for _ in range(batch):
                with unit_of_work():
                    if not self.recovery.fire_due_timer():
                        break
                done += 1
            else:
                full = True
        if self._take_outbox_hint() or outbox:
            with unit_of_work():
                sent = self.dispatcher.run_once(batch, lane)
            done, full = done + sent, full or sent >= batch
        self._housekeeping()
        self.last_pass, self.last_pass_full = time.monotonic(), full
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
        listener = wakeup.listen(self.db, self._notified, self.stop_event) if self.listen else None
        mail = threading.Thread(target=self._loop, args=(self._mail_pass, self.mail_wake), name="worker-mail",
                                daemon=True)
        mail.start()
        self._loop(self._main_pass, self.wake_event)
        mail.join(timeout=10)
        if listener is not None:
            listener.join(timeout=5)
        log.info("worker stopped")

    # A pass returns whether to go again at once. Only a queue that filled its batch may have more
    # waiting: whatever the pass itself wrote (a reply's outbox message, a timer's) was sent later in
    # the same pass, and work stored meanwhile has set the wake event. Going again after every busy pass
    # cost each message a second, empty pass: three transactions and their pool pings.
    #
    # Timers, and outbox messages waiting for a retry, are looked at every idle_sleep seconds, not in
    # every pass: a pass woken for one chat message used to lease the outbox twice and claim timers, as
    # many transactions as the message's own turn. Stored outbox and email messages are announced (see
    # stored()), so they are still sent at once; the mail loop is woken only for email.
    def _main_pass(self) -> bool:
        now = time.monotonic()
        look_all = self._looked_at is None or now - self._looked_at >= self.idle_sleep
        if look_all:
            self._looked_at = now
        try:
            self.run_once(lane=OTHER_LANE, look_all=look_all)
        except BaseException:
            # The retry (in 0.1 to 1 s) looks at everything again: this pass may have used the hint, or
            # given back leases, before it failed.
            self._looked_at = None
            with self._hint_lock:
                self._outbox_hint = True
            raise
        if self.last_pass_full:
            self._looked_at = None  # a full batch of timers or messages: the next pass, at once, goes on
        return self.last_pass_full

    def _mail_pass(self) -> bool:
        with unit_of_work():
            return self.dispatcher.run_once(50, EMAIL_LANE) >= 50

    def _loop(self, one_pass, wake: threading.Event) -> None:
        retry = RETRY_FIRST
        while not self.stop_event.is_set():
            try:
                again = one_pass()
                retry = RETRY_FIRST
            except Exception as exc:  # noqa: BLE001 - e.g. the database restarting; try again shortly
                # The dispatcher has given back its leases (or will, on the next pass that reaches the
                # database), so retrying soon is what makes the fault cost seconds.
                if retry == RETRY_FIRST:
                    log.exception("worker pass failed; retrying")
                else:  # one traceback per outage is enough
                    log.warning("worker pass failed again (%s); retrying in %.1f s", type(exc).__name__, retry)
                self.stop_event.wait(retry)
                retry = min(RETRY_CAP, retry * 2)
                continue
            if not again:
                wake.wait(self.idle_sleep)
                wake.clear()

    def healthy(self, within: float = 60.0) -> bool:
        """Whether the loop finished a pass lately (a pass stuck on a hung call is not healthy)."""
        return self.last_pass is not None and time.monotonic() - self.last_pass < within

    def stop(self) -> None:
        self.stop_event.set()
        self.wake_event.set()
        self.mail_wake.set()
