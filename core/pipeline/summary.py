"""Counting what happened, per source, term and stage, and printing it."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter

OUTCOMES = ("found", "skipped", "downloaded", "duplicate", "dropped", "rejected", "failed",
            "stored")


class Summary:
    def __init__(self, recipe_name: str, redact=None):
        """``redact``: applied to every reason, so that no resolved secret (in a path or
        an endpoint that an error message quotes) reaches the printout or last-run.json."""
        self.redact = redact or (lambda text: text)
        self.recipe_name = self.redact(recipe_name)
        self.started = time.monotonic()
        self.counts: Counter[tuple[str, str, str]] = Counter()  # (source, term, outcome)
        self.reasons: Counter[tuple[str, str, str]] = Counter()  # (source, stage, reason)
        self.outcome = "running"
        self.pending_note = ""
        self.notes: list[str] = []
        self.error = ""  # why the run stopped early, when it did
        self._lock = threading.Lock()  # sources count from their own thread

    def count(self, source: str, term: str | None, outcome: str, n: int = 1) -> None:
        with self._lock:
            self.counts[(source, term or "-", outcome)] += n

    def fail(self, source: str, term: str | None, stage: str, reason: str, outcome: str) -> None:
        self.count(source, term, outcome)
        self.note_reason(source, stage, reason)

    def note(self, text: str) -> None:
        """A line for the end of the printout, once however often it is said."""
        text = self.redact(text)
        with self._lock:
            if text not in self.notes:
                self.notes.append(text)

    def note_reason(self, source: str, stage: str, reason: str) -> None:
        reason = self.redact(reason)
        with self._lock:
            self.reasons[(source, stage, reason)] += 1

    def absorb(self, data: dict) -> None:
        """Adds another run's ``to_dict()`` (a cluster shard's) to these counts."""
        with self._lock:
            for row in data["by_source_term"]:
                for outcome in OUTCOMES:
                    if row.get(outcome):
                        self.counts[(row["source"], row["term"], outcome)] += row[outcome]
            for failure in data["failures"]:
                self.reasons[(failure["source"], failure["stage"], failure["reason"])] += \
                    failure["count"]

    def rows(self) -> list[list]:
        """The counts as ``[source, term, outcome, n]`` rows (what a shard reports)."""
        with self._lock:
            return [[*key, n] for key, n in self.counts.items()]

    def replace_counts(self, rows) -> None:
        """Live counts as ``[source, term, outcome, n]`` rows (a cluster's progress)."""
        with self._lock:
            self.counts = Counter({(s, t, o): n for s, t, o, n in rows})

    def total(self, outcome: str) -> int:
        with self._lock:
            return sum(n for (_, _, kind), n in self.counts.items() if kind == outcome)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def to_dict(self) -> dict:
        rows: dict[tuple[str, str], dict[str, int]] = {}
        with self._lock:
            counts, reasons = dict(self.counts), dict(self.reasons)
        for (source, term, outcome), n in counts.items():
            rows.setdefault((source, term), dict.fromkeys(OUTCOMES, 0))[outcome] += n
        return {
            "recipe": self.recipe_name,
            "outcome": self.outcome,
            "seconds": round(self.elapsed, 3),
            "totals": {outcome: self.total(outcome) for outcome in OUTCOMES},
            "by_source_term": [{"source": s, "term": t, **c} for (s, t), c in sorted(rows.items())],
            "failures": [{"source": s, "stage": st, "reason": r, "count": n}
                         for (s, st, r), n in sorted(reasons.items())],
        }

    def save(self, path) -> None:
        """The summary as JSON (``.harvest/last-run.json``)."""
        path.write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=2), encoding="utf-8")

    @staticmethod
    def _hints(data: dict) -> list[str]:
        """What to do when a run stored nothing: said, not left to be guessed from zeros."""
        totals = data["totals"]
        found, skipped, stored = totals["found"], totals["skipped"], totals["stored"]
        if not found or stored:
            return []
        if skipped == found:
            return ["nothing new: every record found ended in an earlier run; after changing "
                    "the recipe, `harvest run RECIPE --reconsider rejected,dropped,failed` "
                    "sends those that did not make it through again"]
        if not data["failures"]:
            return []
        top = max(data["failures"], key=lambda failure: failure["count"])
        return [f"nothing stored: all {found - skipped} records found were rejected, dropped "
                f"or failed; the most common reason ({top['count']}): "
                f"{printable(top['reason'], 200)}"]

    def render(self) -> str:
        data = self.to_dict()
        header = ["source", "term", *OUTCOMES]
        table = [header] + [[printable(row["source"], 40), printable(row["term"], 40),
                             *(str(row[o]) for o in OUTCOMES)]
                            for row in data["by_source_term"]]
        table.append(["all", "", *(str(data["totals"][o]) for o in OUTCOMES)])
        widths = [max(_width(row[i]) for row in table) for i in range(len(header))]
        lines = [f"harvest {printable(self.recipe_name, 80)}: {self.outcome} in "
                 f"{self.elapsed:.1f} s"]
        for row in table:
            lines.append("  " + "  ".join(cell + " " * (widths[i] - _width(cell))
                                          for i, cell in enumerate(row)))
        if data["failures"]:
            lines.append("  reasons:")
            for failure in data["failures"]:
                lines.append(f"    {failure['count']:>5}  {printable(failure['source'], 40)} "
                             f"{printable(failure['stage'], 40)}: "
                             f"{printable(failure['reason'], 300)}")
        lines.extend(f"  {hint}" for hint in self._hints(data))
        for note in self.notes:
            lines.append(f"  {note}")
        if self.pending_note:
            lines.append(f"  {self.pending_note}")
        return "\n".join(lines)


def printable(text: str, limit: int = 200) -> str:
    """Text from the outside world (terms, reasons, server messages) made safe for a
    terminal: control and bidirectional-override characters shown as escapes, so they
    cannot move the cursor, recolour, hide or fake lines; and cut at ``limit`` columns."""
    out = []
    for ch in str(text):
        code = ord(ch)
        if code < 0x20 or 0x7F <= code < 0xA0 or 0x202A <= code <= 0x202E \
                or 0x2066 <= code <= 0x2069 or code in (0x200E, 0x200F, 0x061C):
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    safe = "".join(out)
    if _width(safe) <= limit:
        return safe
    width = 0
    for index, ch in enumerate(safe):
        width += _width(ch)
        if width > limit - 1:
            return safe[:index] + "…"
    return safe


def _width(text: str) -> int:
    import unicodedata
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


class Progress:
    """A tqdm bar on a terminal; a line every few seconds otherwise (logs, CI)."""

    def __init__(self, summary: Summary, enabled: bool = True, interval: float = 5.0):
        self.summary = summary
        self.interval = interval
        self.bar = None
        self.last_line = time.monotonic()
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(unit="img", desc=printable(summary.recipe_name, 40),
                            dynamic_ncols=True)
        self.shown = 0

    def update(self) -> None:
        if not self.enabled:
            return
        stored = self.summary.total("stored")
        if self.bar is not None:
            self.bar.update(stored - self.shown)
            self.shown = stored
            # As text: tqdm writes numbers of 5 digits and more as 2e+4.
            failed = self.summary.total("failed") + self.summary.total("rejected")
            self.bar.set_postfix(found=f"{self.summary.total('found'):,}", failed=f"{failed:,}",
                                 refresh=False)
        elif time.monotonic() - self.last_line >= self.interval:
            self.last_line = time.monotonic()
            s = self.summary
            print(f"progress: {s.total('found')} found, {s.total('downloaded')} downloaded, "
                  f"{stored} stored, {s.total('failed') + s.total('rejected')} failed, "
                  f"{s.elapsed:.0f} s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
