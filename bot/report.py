"""`recoverybot report`: the funnel, where cases stopped, how long decisions and recoveries took, and
the queues right now, as text or as an SVG chart (the same panels the Grafana dashboard shows)."""
from __future__ import annotations

from datetime import datetime
from xml.sax.saxutils import escape

from recovery.stats import Queues, Report, percentile

PERCENTILES = (50, 90, 99)
INK, MUTED, BRAND, GOOD, BAD, GRID = "#1b1f24", "#6a737d", "#3d5afe", "#2e7d32", "#c62828", "#e3e6ea"
FONT = "-apple-system, 'Segoe UI', Roboto, 'Noto Sans TC', sans-serif"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    minutes, hours, days = s // 60 % 60, s // 3600 % 24, s // 86400
    if days:
        return f"{days}d {hours}h"
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m"


def stopped_rows(r: Report) -> list[tuple[str, int]]:
    return [(f"{state} while {source.replace('_', ' ')}", n)
            for (state, source), n in sorted(r.ended.items(), key=lambda kv: (-kv[1], kv[0]))
            if state != "completed"]


def queue_rows(q: Queues, now: datetime) -> list[tuple[str, str]]:
    waiting = duration((now - q.oldest_awaiting_approval).total_seconds()) if q.oldest_awaiting_approval else "-"
    return [("awaiting approval", str(q.cases.get("awaiting_approval", 0))),
            ("oldest waiting", waiting),
            ("inbox backlog", str(q.inbox_backlog)),
            ("outbox ready", str(sum(q.outbox_ready.values()))),
            ("outbox dead", str(sum(q.outbox_dead.values()))),
            ("workers alive", str(q.workers_alive))]


def _timing(values: list[float]) -> list[tuple[str, float | None]]:
    return [(f"p{p}", percentile(values, p)) for p in PERCENTILES] + [("max", values[-1] if values else None)]


def text(r: Report, q: Queues, now: datetime) -> str:
    days = (r.until - r.since).days
    opened = r.funnel[0][1]
    lines = [f"Recovery report: cases opened {r.since:%Y-%m-%d %H:%M} to {r.until:%Y-%m-%d %H:%M} UTC "
             f"({days} days)", "", "Funnel"]
    for stage, n in r.funnel:
        share = f"{100 * n / opened:5.1f}%" if opened else "    -"
        lines.append(f"  {stage:<10} {n:>6}  {share}  {'#' * (round(30 * n / opened) if opened else 0)}")
    if r.decoys:
        lines.append(f"  ({r.decoys} of the opened cases could never pass: unknown email or over a limit)")
    lines += ["", "Where the others stopped"]
    lines += [f"  {label:<40} {n:>6}" for label, n in stopped_rows(r)] or ["  (none)"]
    if r.still_open:
        lines.append("  still open: " + ", ".join(f"{s} {n}" for s, n in sorted(r.still_open.items())))
    for title, values in (("Time to decision (approvers asked -> decided)", r.to_decision),
                          ("Time to complete (opened -> new authenticator confirmed)", r.to_completion)):
        lines += ["", f"{title}: {len(values)} cases",
                  "  " + "   ".join(f"{name} {duration(v)}" for name, v in _timing(values))]
    lines += ["", f"Right now ({now:%Y-%m-%d %H:%M} UTC)"]
    lines += [f"  {label:<18} {value}" for label, value in queue_rows(q, now)]
    return "\n".join(lines) + "\n"


# ---- SVG -------------------------------------------------------------------------------------------------

class _Svg:
    def __init__(self, width: int, height: int):
        self.width, self.height, self.parts = width, height, []

    def text(self, x, y, s, *, size=13, fill=INK, anchor="start", weight="normal"):
        self.parts.append(f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" fill="{fill}" '
                          f'text-anchor="{anchor}" font-weight="{weight}">{escape(str(s))}</text>')

    def rect(self, x, y, w, h, fill, rx=3):
        self.parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(0.0, w):.1f}" height="{h:.1f}" '
                          f'rx="{rx}" fill="{fill}"/>')

    def panel(self, x, y, w, h, title):
        self.parts.append(f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="10" fill="#fff" '
                          f'stroke="{GRID}"/>')
        self.text(x + 16, y + 26, title, size=15, weight="600")

    def bars(self, x, y, w, rows, *, color, fmt=str, label_w=190):
        top = max((v or 0 for _, v in rows), default=0) or 1
        for i, (label, value) in enumerate(rows):
            row_y = y + i * 30
            self.text(x, row_y + 15, label, fill=MUTED)
            self.rect(x + label_w, row_y + 2, (w - label_w - 90) * (value or 0) / top, 18, color)
            self.text(x + w - 80, row_y + 15, fmt(value), weight="600")

    def render(self) -> str:
        body = "\n".join(self.parts)
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width}" height="{self.height}" '
                f'viewBox="0 0 {self.width} {self.height}" font-family="{escape(FONT)}">\n'
                f'<rect width="100%" height="100%" fill="#f5f7fa"/>\n{body}\n</svg>\n')


def svg(r: Report, q: Queues, now: datetime, *, title: str = "Recovery Bot") -> str:
    g = _Svg(1200, 860)
    g.text(24, 40, f"{title}: recoveries opened {r.since:%Y-%m-%d} to {r.until:%Y-%m-%d}", size=22, weight="600")
    g.text(24, 64, f"from the audit log and the queues, {now:%Y-%m-%d %H:%M} UTC", fill=MUTED)

    opened = r.funnel[0][1]
    g.panel(24, 84, 568, 220, "Funnel")
    g.bars(40, 120, 536, r.funnel, color=BRAND,
           fmt=lambda n: f"{n} ({100 * n / opened:.0f}%)" if opened else str(n), label_w=110)
    if r.decoys:
        g.text(40, 292, f"{r.decoys} opened cases could never pass (unknown email or over a limit)", size=12,
               fill=MUTED)

    stopped = stopped_rows(r)[:6] or [("(none)", 0)]
    g.panel(608, 84, 568, 220, "Where the others stopped")
    g.bars(624, 120, 536, stopped, color=BAD, label_w=260)

    g.panel(24, 320, 568, 250, "Time to decision and to complete")
    rows = [(f"decision {n}", v) for n, v in _timing(r.to_decision) if n != "p99"]
    rows += [(f"complete {n}", v) for n, v in _timing(r.to_completion) if n != "p99"]
    g.bars(40, 356, 536, rows, color=GOOD, fmt=duration, label_w=120)
    g.text(40, 554, f"{len(r.to_decision)} decisions, {len(r.to_completion)} completed recoveries", size=12,
           fill=MUTED)

    g.panel(608, 320, 568, 250, "Right now")
    for i, (label, value) in enumerate(queue_rows(q, now)):
        col, row = i % 3, i // 3
        x, y = 624 + col * 180, 352 + row * 100
        alarm = label in ("outbox dead",) and value != "0" or label == "workers alive" and value == "0"
        g.rect(x, y, 168, 84, "#fdecea" if alarm else "#eef1fe", rx=8)
        g.text(x + 84, y + 44, value, size=26, weight="700", anchor="middle", fill=BAD if alarm else INK)
        g.text(x + 84, y + 70, label, size=12, anchor="middle", fill=MUTED)

    g.panel(24, 586, 1152, 250, "Cases opened and completed per day")
    days = r.per_day[-31:]
    top = max((max(o, c) for _, o, c in days), default=0) or 1
    step = 1110 / max(1, len(days))
    for i, (day, o, c) in enumerate(days):
        x = 44 + i * step
        bar = min(16.0, step / 2 - 2)
        g.rect(x, 800 - 170 * o / top, bar, 170 * o / top, BRAND, rx=2)
        g.rect(x + bar + 1, 800 - 170 * c / top, bar, 170 * c / top, GOOD, rx=2)
        if len(days) <= 16 or i % 2 == 0:
            g.text(x + bar, 820, day[5:], size=11, fill=MUTED, anchor="middle")
    g.rect(960, 604, 12, 12, BRAND, rx=2)
    g.text(978, 615, "opened", size=12, fill=MUTED)
    g.rect(1050, 604, 12, 12, GOOD, rx=2)
    g.text(1068, 615, "completed", size=12, fill=MUTED)
    return g.render()
