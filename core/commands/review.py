"""``harvest review``: a local web page to choose score thresholds and curate a harvest.

The page (``static/review.html``, plain HTML and JavaScript, no build step) talks to a
small Flask app. Manual keep/reject decisions and thresholds are written to
``.harvest/review.sqlite`` as soon as they are made, and ``harvest export`` reads that
file with the same rule (``curation.verdict``), so the dataset is what the page shows.
The page starts from the recipe's ``keep_if`` (``.harvest/scoring.json``). "Write recipe
snippet" writes ``review-recipe.yml`` (the thresholds as ``keep_if``) and
``.harvest/review.json``.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import re
import secrets
import socket
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from ..cleaning.curation import (
    OPERATORS,
    Verdicts,
    effective,
    lay_over,
    operator_of,
    passes,
    read_overlays,
    recipe_thresholds,
    score_fields,
    score_of,
    set_aside_ids,
    verdict,
)
from ..errors import UsageError
from ..output.crypto import ENCRYPTED, FieldCipher, Keyring
from ..output.records import read_records
from ..output.storage import stored_file

log = logging.getLogger("harvest.review")
THUMB_SIDE = 256
BINS = 20
FACETS = ("source", "term", "lang", "license", "country", "city", "matched_in")
SHOWS = ("all", "kept", "dropped", "manual", "near-duplicates")
MAX_BODY = 1024 * 1024  # the page's largest request (every threshold, filter, sort) is < 10 kB
SHA256 = re.compile(r"[0-9a-f]{64}")
STATIC = Path(__file__).parent / "static"
TRAINING_REPORT = Path(".harvest") / "train-report.json"
NO_TOKEN_PAGE = ("<!doctype html><meta charset=utf-8><title>harvest review</title>"
                 "<p style='font:16px system-ui;margin:3em'>This page needs the address "
                 "<code>harvest review</code> printed when it started: it carries a token "
                 "(<code>?token=...</code>), so that other pages cannot drive this one. "
                 "Copy it from the terminal.</p>")


class Review:
    def __init__(self, output: Path, keyring: Keyring | None = None):
        self.output = output
        records_path = output / "records.jsonl"
        if not (output / ".harvest").is_dir() or not records_path.is_file():
            raise UsageError(f"{output}: not a harvest output folder (no records.jsonl and "
                             f".harvest/); give the folder a recipe's `output:` names")
        self.cipher = FieldCipher(keyring) if keyring else None
        self.records: list[dict] = []
        self.by_id: dict[str, dict] = {}
        self.by_sha: dict[str, Path] = {}
        self.load(records_path)
        self.thumbs = output / ".harvest" / "thumbs"
        self.thumbs.mkdir(exist_ok=True)
        self.db = sqlite3.connect(output / ".harvest" / "review.sqlite", check_same_thread=False,
                                  isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS decisions (id TEXT PRIMARY KEY, "
                        "decision TEXT NOT NULL, updated REAL NOT NULL)")
        self.db.execute("CREATE TABLE IF NOT EXISTS thresholds (term TEXT PRIMARY KEY, "
                        "rule TEXT NOT NULL)")
        self.lock = threading.Lock()

    def load(self, path: Path) -> None:
        self.missing = 0
        root = self.output.resolve()
        for record in read_records(path):
            file_info = record.get("file") or {}
            if not file_info.get("sha256") or record.get("duplicate_of"):
                continue
            try:
                image = stored_file(root, record)
            except ValueError as refused:  # export skips it too: never served
                log.warning("%s skipped: %s", str(record.get("id"))[:100], refused)
                self.missing += 1
                continue
            if not image.is_file():
                self.missing += 1  # export leaves it out: so does the page
                continue
            encrypted = set((record.get(ENCRYPTED) or {}).get("fields", []))
            if self.cipher is not None and encrypted:
                record = self.cipher.decrypt(record)
                encrypted = set()
            record["_encrypted_fields"] = sorted(encrypted)
            self.records.append(record)
            self.by_id[record["id"]] = record
            self.by_sha[file_info["sha256"]] = image
        self.terms = sorted({term for r in self.records for term in (r.get("scores") or {})})
        self.lay_overlays()

    def lay_overlays(self) -> None:
        """Lays the output's score overlays (``harvest train``'s ``learned``) over the
        records, and makes the sliders again: called at load and after training."""
        overlays = read_overlays(self.output)
        for record in self.records:
            for field in overlays:
                record.pop(field, None)
            lay_over(record, overlays)
        self.score_fields = score_fields(self.output)
        self.keys = self._score_keys()
        self.aside = set_aside_ids(self.output)
        self.groups = self._near_duplicate_groups()
        self.head_of = {member: head for head, members in self.groups.items()
                        for member in [head, *members]}

    def _score_keys(self) -> list[dict]:
        """One slider per score: the scorers' terms (0 to 1), then each enricher's own
        scores (``quality.blur``...), over the range the records have. Each record's
        scores are read here once, into ``_scores``: every view reads them all."""
        names = list(self.terms)
        for field in self.score_fields:
            names += sorted({f"{field}.{name}" for r in self.records
                             for name, value in (r.get(field) or {}).items()
                             if isinstance(value, (int, float)) and not isinstance(value, bool)})
        for record in self.records:
            record["_scores"] = {key: value for key in names
                                 if (value := score_of(record, key)) is not None}
        keys = [{"key": term, "label": term, "min": 0.0, "max": 1.0} for term in self.terms]
        for key in names[len(self.terms):]:
            values = [r["_scores"][key] for r in self.records if key in r["_scores"]]
            low, high = min(values), max(values)
            keys.append({"key": key, "label": key.replace(".", " ", 1), "min": low,
                         "max": high if high > low else low + 1.0})
        return keys

    def _near_duplicate_groups(self) -> dict[str, list[str]]:
        """Picture kept -> its near-duplicates (marked copies, and earlier copies set aside
        for it), from the records and the set-aside list."""
        groups: dict[str, list[str]] = {}
        for record in self.records:
            first = record.get("near_duplicate_of")
            if first:
                groups.setdefault(first, []).append(record["id"])
        for record_id, reason in self.aside.items():
            found = re.match(r"near duplicate of (\S+) \(", reason or "")
            if found and record_id in self.by_id:
                groups.setdefault(found.group(1), []).append(record_id)
        return {first: members for first, members in groups.items() if first in self.by_id}

    def group_of(self, record_id: str) -> str | None:
        return self.head_of.get(record_id)

    # -- state -----------------------------------------------------------------------------

    def decisions(self) -> dict[str, str]:
        with self.lock:
            return dict(self.db.execute("SELECT id, decision FROM decisions"))

    def decide(self, record_id: str, decision: str) -> None:
        if record_id not in self.by_id:
            raise KeyError(record_id)
        with self.lock:
            if decision == "none":
                self.db.execute("DELETE FROM decisions WHERE id = ?", (record_id,))
            else:
                self.db.execute("INSERT INTO decisions VALUES (?, ?, ?) ON CONFLICT(id) DO "
                                "UPDATE SET decision = excluded.decision, updated = "
                                "excluded.updated", (record_id, decision, time.time()))

    def thresholds(self) -> dict[str, dict]:
        with self.lock:
            return {term: json.loads(rule) for term, rule in
                    self.db.execute("SELECT term, rule FROM thresholds")}

    def save(self, thresholds: dict[str, dict]) -> dict[str, str]:
        self.store_thresholds(thresholds)
        decisions = self.decisions()
        (self.output / ".harvest" / "review.json").write_text(json.dumps(
            {"thresholds": thresholds, "decisions": decisions}, indent=2, sort_keys=True),
            encoding="utf-8")
        by_field: dict[str, dict] = {}
        for key, rule in sorted(effective(thresholds).items()):
            field, dot, name = key.partition(".")
            if not (dot and field in self.score_fields):
                field, name = "scores", key
            by_field.setdefault(field, {})[name] = f"{operator_of(rule)}{float(rule['value']):g}"
        snippet = self.output / "review-recipe.yml"
        lines = ["# Thresholds chosen in `harvest review`; paste each keep_if under the options "
                 "of the enricher that scores that field (scores: your scorer, such as vision)."]
        body = by_field.pop("scores", {})
        text = yaml.safe_dump({"keep_if": body}, allow_unicode=True, sort_keys=True)
        for field, rules in sorted(by_field.items()):
            text += f"# {field}:\n" + "".join(
                f"#   {line}\n" for line in yaml.safe_dump({"keep_if": rules}, allow_unicode=True,
                                                         sort_keys=True).splitlines())
        snippet.write_text("\n".join(lines) + "\n" + text, encoding="utf-8")
        return {"snippet": str(snippet), "decisions": str(len(decisions))}

    # -- views -----------------------------------------------------------------------------

    def meta(self) -> dict[str, Any]:
        facets: dict[str, dict[str, int]] = {name: {} for name in FACETS}
        for record in self.records:
            for name in FACETS:
                value = _facet(record.get(name))
                if value not in (None, ""):
                    facets[name][value] = facets[name].get(value, 0) + 1
        thresholds = self.thresholds()
        if not thresholds:
            # Where the recipe left the harvest; stored at once, so export agrees.
            thresholds = {key: rule for key, rule in recipe_thresholds(self.output).items()
                          if any(k["key"] == key for k in self.keys)}
            if thresholds:
                self.store_thresholds(thresholds)
        return {"terms": self.terms, "keys": self.keys, "facets": facets,
                "total": len(self.records), "thresholds": thresholds, "bins": BINS,
                "missing": self.missing, "groups": len(self.groups),
                "training": self.last_training()}

    def train(self) -> dict[str, Any]:
        """``harvest train`` from the page: learns from the marks made so far, lays the
        new ``learned`` scores over the records and keeps the report for the page."""
        from .train import train

        with self.lock:
            report = train(self.output).to_dict()
            report["at"] = time.time()
            path = self.output / TRAINING_REPORT
            temp = path.with_suffix(".tmp")
            temp.write_text(json.dumps(report, indent=2), encoding="utf-8")
            temp.replace(path)
            self.lay_overlays()
        return report

    def last_training(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.output / TRAINING_REPORT).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def store_thresholds(self, thresholds: dict[str, dict]) -> None:
        """Every change applies at once: what the page shows is what export writes."""
        with self.lock:
            self.db.execute("BEGIN")
            self.db.execute("DELETE FROM thresholds")
            self.db.executemany("INSERT INTO thresholds VALUES (?, ?)",
                                [(t, json.dumps(r)) for t, r in thresholds.items()])
            self.db.execute("COMMIT")

    def view(self, query: dict) -> dict[str, Any]:
        filters = {k: v for k, v in query.get("filters", {}).items() if v not in (None, "")}
        thresholds = query.get("thresholds")
        if thresholds is None:
            thresholds = self.thresholds()
        elif thresholds != self.thresholds():
            self.store_thresholds(thresholds)
        show = query.get("show", "all")
        offset, limit = max(0, query.get("offset", 0)), max(0, min(query.get("limit", 120), 1000))
        decisions = self.decisions()
        judge = Verdicts(thresholds, decisions, self.aside, _known_score)
        histograms = {k["key"]: {"kept": [0] * BINS, "dropped": [0] * BINS} for k in self.keys}
        scales = {k["key"]: (k["min"], BINS / (k["max"] - k["min"])) for k in self.keys}
        kept = dropped = 0
        items = []
        for record in self.records:
            if filters and any(_facet(record.get(name)) != value
                               for name, value in filters.items()):
                continue
            is_kept, manual, why = judge(record)
            side = "kept" if is_kept else "dropped"
            for key, score in record["_scores"].items():
                low, scale = scales[key]
                histograms[key][side][min(BINS - 1, max(0, int((score - low) * scale)))] += 1
            kept += is_kept
            dropped += not is_kept
            if (show == "kept" and not is_kept or show == "dropped" and is_kept
                    or show == "manual" and not manual
                    or show == "near-duplicates" and self.group_of(record["id"]) is None):
                continue
            items.append((record, is_kept, manual, why))
        items = self._sorted(items, query.get("sort", {}), thresholds)
        page = [self._item(r, k, m, w) for r, k, m, w in items[offset: offset + limit]]
        return {"kept": kept, "dropped": dropped, "matching": kept + dropped,
                "shown": len(items), "histograms": histograms, "items": page,
                "offset": offset, "agreement": self.agreement(thresholds, decisions)}

    def _sorted(self, items: list, sort: dict, thresholds: dict) -> list:
        """By a score, or by the distance of a score from its threshold (the pictures
        next to the cut are the ones worth a look); records without the score last."""
        key, descending = sort.get("key") or "", bool(sort.get("descending"))
        if not key:
            return items
        cut = None
        if key.startswith("margin:"):
            key = key[len("margin:"):]
            if key in thresholds:
                cut = float(thresholds[key].get("value", 0))
            else:  # no cut yet: the middle of the score's range (0.5 for a learned score)
                info = next((k for k in self.keys if k["key"] == key), None)
                if info is None:
                    return items
                cut = (info["min"] + info["max"]) / 2
        measured = [(item, item[0]["_scores"].get(key)) for item in items]
        present = [(item, value if cut is None else abs(value - cut))
                   for item, value in measured if value is not None]
        present.sort(key=lambda pair: pair[1], reverse=descending)
        return [item for item, _ in present] + [item for item, value in measured if value is None]

    def _item(self, record: dict, kept: bool, manual: bool, why: str) -> dict:
        group = self.group_of(record["id"])
        return {"id": record["id"], "sha": record["file"]["sha256"],
                "title": record.get("title") or "", "kept": kept, "manual": manual,
                "why": why, "scores": record["_scores"],
                "group": None if group is None else {"head": group,
                                                     "size": 1 + len(self.groups[group])}}

    def agreement(self, thresholds: dict, decisions: dict[str, str]) -> dict[str, dict]:
        """For each score with a threshold, how the threshold agrees with the pictures
        marked by hand (kept by hand: positive): precision, recall and F1, and the
        threshold that would maximise F1 on those marks."""
        marked = [(self.by_id[i], d == "keep") for i, d in decisions.items()
                  if i in self.by_id and d in ("keep", "reject")]
        if not any(k for _, k in marked) or all(k for _, k in marked):
            return {}
        found = {}
        for key, rule in effective(thresholds).items():
            pairs = [(r["_scores"].get(key), wanted) for r, wanted in marked]
            pairs = [(0.0 if s is None and "." not in key else s, w) for s, w in pairs]
            pairs = [(s, w) for s, w in pairs if s is not None]
            if not pairs:
                continue
            current = _agreement(pairs, rule)
            best = max(({**_agreement(pairs, {**rule, "value": s}), "value": s}
                        for s in sorted({s for s, _ in pairs})),
                       key=lambda a: (a["f1"], -abs(a["value"] - float(rule["value"]))))
            found[key] = {**current, "marked": len(pairs), "best": best}
        return found

    def detail(self, record_id: str) -> dict[str, Any]:
        record = self.by_id[record_id]
        decisions = self.decisions()
        kept, manual, why = verdict(record, self.thresholds(), decisions, self.aside)
        hidden = set(record.get("_encrypted_fields", []))
        fields = {k: ("(encrypted: start the review with --key-file to see it)"
                      if k in hidden else v)
                  for k, v in record.items() if not k.startswith("_") and k != "exif"}
        ifd0 = ((record.get("exif") or {}).get("IFD0") or {}) if "exif" not in hidden else {}
        camera = " ".join(str(ifd0[k]) for k in ("Make", "Model") if ifd0.get(k)) or None
        group = self.group_of(record_id)
        return {"record": fields, "rows": _rows(fields), "decision": decisions.get(record_id),
                "sha": record["file"]["sha256"], "kept": kept, "manual": manual, "why": why,
                "scores": record["_scores"],
                "labels": record.get("labels") or {}, "camera": camera,
                "place": ", ".join(str(fields[k]) for k in ("city", "country")
                                   if fields.get(k) and k not in hidden) or None,
                "license": fields.get("license"), "attribution": fields.get("attribution"),
                "page_url": _web_link(fields.get("page_url")), "title": fields.get("title"),
                "group": None if group is None else group}

    def group(self, head: str) -> list[dict]:
        """A near-duplicate group, the picture kept first, side by side on the page."""
        decisions, thresholds = self.decisions(), self.thresholds()
        members = [head, *self.groups.get(head, [])]
        shown = []
        for record_id in members:
            record = self.by_id[record_id]
            kept, manual, why = verdict(record, thresholds, decisions, self.aside)
            file_info = record["file"]
            shown.append({"id": record_id, "sha": file_info["sha256"], "kept": kept,
                          "why": why, "width": file_info.get("width"),
                          "height": file_info.get("height"), "license": record.get("license"),
                          "distance": record.get("near_duplicate_distance"),
                          "source": record.get("source")})
        return shown

    def thumbnail(self, sha: str) -> Path | None:
        """The cached thumbnail, made on first request; None when the image is unreadable."""
        cached = self.thumbs / f"{sha}.jpg"
        if cached.is_file():
            return cached
        source = self.by_sha.get(sha)
        if source is None:
            return None
        try:
            with Image.open(source) as image:
                image.draft("RGB", (THUMB_SIDE, THUMB_SIDE))
                image = image.convert("RGB")
                image.thumbnail((THUMB_SIDE, THUMB_SIDE))
                temp = cached.with_suffix(f".{threading.get_ident()}.tmp")
                image.save(temp, "JPEG", quality=80)
                temp.replace(cached)
        except (OSError, ValueError, SyntaxError) as exc:
            log.warning("thumbnail for %s: %s", sha[:12], exc)
            return None
        return cached


def _facet(value) -> str | None:
    """A record's value as a facet shows it: a list as its items joined (``title+tags``),
    an empty one as ``none``."""
    if isinstance(value, list):
        return "+".join(map(str, value)) or "none"
    return None if value is None else str(value)


def _known_score(record: dict, key: str) -> float | None:
    return record["_scores"].get(key)


def _agreement(pairs: list[tuple[float, bool]], rule: dict) -> dict:
    true_pos = sum(1 for score, wanted in pairs if wanted and passes(score, rule))
    false_pos = sum(1 for score, wanted in pairs if not wanted and passes(score, rule))
    false_neg = sum(1 for score, wanted in pairs if wanted and not passes(score, rule))
    precision = true_pos / (true_pos + false_pos) if true_pos + false_pos else 0.0
    recall = true_pos / (true_pos + false_neg) if true_pos + false_neg else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": round(precision, 3), "recall": round(recall, 3), "f1": round(f1, 3)}


def _rows(fields: dict, prefix: str = "") -> list[list[str]]:
    """Nested fields as (name, text) rows, ``a.b`` for a field inside another, so the page
    shows a small table rather than clipped JSON."""
    rows = []
    for key, value in fields.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            rows.extend(_rows(value, f"{name}."))
        elif isinstance(value, list):
            simple = all(not isinstance(v, (dict, list)) for v in value)
            rows.append([name, ", ".join(map(str, value)) if simple else json.dumps(value)])
        else:
            rows.append([name, "" if value is None else str(value)])
    return rows


def _web_link(url) -> str | None:
    """Only http(s) links become clickable: a record's URL is not the page's to trust."""
    return url if isinstance(url, str) and re.match(r"https?://", url) else None


class BadRequest(ValueError):
    """A request the page would not send: answered 400 with this one line."""


def _json_object(data: bytes) -> dict:
    try:
        body = json.loads(data) if data.strip() else None
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than Python's stack
        raise BadRequest("the body is not JSON") from None
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def _expect(body: dict, key: str, kinds: type | tuple, what: str, default):
    """``body[key]`` (or ``default``) when it is of ``kinds``, else BadRequest. JSON's
    true is a Python int: it is a number only where a bool is asked for."""
    value = body.get(key, default)
    if not isinstance(value, kinds) or isinstance(value, bool) and kinds is not bool:
        raise BadRequest(f"{key} must be {what}")
    return value


def _rules(value, key: str = "thresholds") -> dict[str, dict]:
    """Threshold rules as the page sends them: ``{score: {op|direction, value, enabled}}``."""
    if not isinstance(value, dict):
        raise BadRequest(f"{key} must be an object of score: rule")
    for score, rule in value.items():
        where = f"{key}.{score}"[:80]
        if not isinstance(rule, dict):
            raise BadRequest(f"{where} must be an object")
        number = _expect(rule, "value", (int, float), "a number", 0)
        if not math.isfinite(number):
            raise BadRequest(f"{where}.value must be a finite number")
        if rule.get("op", ">=") not in OPERATORS:
            raise BadRequest(f"{where}.op must be one of {' '.join(OPERATORS)}")
        if rule.get("direction", "above") not in ("above", "below"):
            raise BadRequest(f"{where}.direction must be above or below")
        _expect(rule, "enabled", bool, "true or false", True)
    return value


def view_query(body: dict) -> dict:
    """``/api/view``'s body, each field checked: what ``Review.view`` may rely on."""
    filters = _expect(body, "filters", dict, "an object of facet: value", {})
    if not all(isinstance(v, (str, type(None))) for v in filters.values()):
        raise BadRequest("filters must map each facet to a text or null")
    sort = _expect(body, "sort", dict, "an object {key, descending}", {})
    _expect(sort, "key", str, "a text", "")
    _expect(sort, "descending", bool, "true or false", False)
    if _expect(body, "show", str, "a text", "all") not in SHOWS:
        raise BadRequest(f"show must be one of {', '.join(SHOWS)}")
    _expect(body, "offset", int, "a whole number", 0)
    _expect(body, "limit", int, "a whole number", 120)
    if body.get("thresholds") is not None:
        _rules(body["thresholds"])
    return body


PLACEHOLDER = (b'<svg xmlns="http://www.w3.org/2000/svg" width="256" height="256">'
               b'<rect width="256" height="256" fill="#ddd"/><text x="128" y="134" '
               b'font-size="18" text-anchor="middle" fill="#666">unreadable image</text></svg>')


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


def create_app(review: Review, token: str, port: int, allow_remote: bool = False):
    """The page and its API. Any web page the user visits can send requests to a server
    on localhost, and a DNS-rebinding page can even read the answers; so every request
    must carry the token printed at start (in the URL, as Jupyter does), the Host must
    be this machine's loopback name (unless --allow-remote), and a state-changing request
    must be JSON (which a cross-origin form cannot send without a preflight) from the
    page's own origin."""
    from flask import Flask, abort, jsonify, request, send_file
    from werkzeug.exceptions import HTTPException

    app = Flask(__name__, static_folder=None)
    # Werkzeug answers 413 from the Content-Length alone, before reading the body.
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    hosts = {f"{name}:{port}" for name in LOOPBACK_NAMES}

    def body() -> dict:
        # A chunked body has no length to check first; its stream gives a chunk per read
        # and raises 413 on the read past the limit.
        pieces = []
        while piece := request.stream.read(65536):
            pieces.append(piece)
        return _json_object(b"".join(pieces))

    @app.errorhandler(BadRequest)
    def bad_request(error):
        return jsonify({"error": str(error)}), 400

    @app.errorhandler(HTTPException)
    def http_error(error):
        return jsonify({"error": error.description}), error.code

    @app.errorhandler(Exception)
    def unexpected(error):
        # One line here and to the page; the traceback would quote records' values.
        log.error("review: %s: %s", request.path[:100], error.__class__.__name__)
        return jsonify({"error": f"internal error ({error.__class__.__name__})"}), 500

    def known_sha(sha: str) -> str:
        if not SHA256.fullmatch(sha):
            raise BadRequest("an image is named by its SHA-256 (64 hexadecimal digits)")
        return sha

    @app.before_request
    def guard():
        if not allow_remote and request.host not in hosts:
            return jsonify({"error": "wrong Host: open the address harvest review printed"}), 403
        given = request.headers.get("X-Harvest-Token") or request.args.get("token") or ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            if request.method == "GET" and request.path == "/":  # a person, in a browser
                return NO_TOKEN_PAGE, 403, {"Content-Type": "text/html; charset=utf-8"}
            return jsonify({"error": "no or wrong token: open the address harvest review "
                                     "printed (it carries the token)"}), 403
        if request.method == "POST":
            origin = request.headers.get("Origin")
            if origin is not None and origin != f"{request.scheme}://{request.host}":
                return jsonify({"error": "cross-origin request refused"}), 403
            if not request.is_json:
                return jsonify({"error": "JSON only (Content-Type: application/json)"}), 415
        return None

    @app.get("/")
    def page():
        return send_file(STATIC / "review.html", mimetype="text/html")

    @app.get("/api/meta")
    def meta():
        return jsonify(review.meta())

    @app.post("/api/view")
    def view():
        return jsonify(review.view(view_query(body())))

    @app.get("/api/record/<path:record_id>")
    def detail(record_id):
        if record_id not in review.by_id:
            abort(404)
        return jsonify(review.detail(record_id))

    @app.post("/api/decision")
    def decide():
        asked = body()
        if asked.get("decision") not in ("keep", "reject", "none"):
            raise BadRequest("decision must be keep, reject or none")
        try:
            review.decide(_expect(asked, "id", str, "a record id", ""), asked["decision"])
        except KeyError:
            return jsonify({"error": "no such record"}), 404
        return jsonify({"ok": True})

    @app.post("/api/train")
    def train():
        body()
        try:
            return jsonify(review.train())
        except UsageError as error:
            return jsonify({"error": str(error)}), 400

    @app.post("/api/save")
    def save():
        return jsonify(review.save(_rules(body().get("thresholds") or {})))

    @app.get("/api/group/<path:record_id>")
    def group(record_id):
        head = review.group_of(record_id)
        if head is None:
            abort(404)
        return jsonify({"head": head, "members": review.group(head)})

    @app.get("/thumb/<sha>")
    def thumb(sha):
        path = review.thumbnail(known_sha(sha))
        if path is None:
            return PLACEHOLDER, 200, {"Content-Type": "image/svg+xml"}
        return send_file(path, mimetype="image/jpeg", max_age=86400)

    @app.get("/image/<sha>")
    def image(sha):
        path = review.by_sha.get(known_sha(sha))
        if path is None or not path.is_file():
            return PLACEHOLDER, 200, {"Content-Type": "image/svg+xml"}
        return send_file(path)

    return app


def serve(output: Path, host: str, port: int, keyring: Keyring | None = None,
          allow_remote: bool = False) -> None:
    from werkzeug.serving import make_server

    output = output.resolve()  # Flask would resolve a relative one against its own package
    loopback = host in ("127.0.0.1", "localhost", "::1")
    if not loopback and not allow_remote:
        raise UsageError(f"--host {host} would let other machines reach this harvest (and "
                         f"its decrypted fields with --key-file); add --allow-remote if you "
                         f"mean it")
    review = Review(output, keyring)
    token = secrets.token_urlsafe(24)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not one line per thumbnail
    try:
        # Bound here, so that a port in use is one line of ours, not Werkzeug's.
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(128)
    except socket.gaierror:
        raise UsageError(f"cannot listen on {host}: unknown address") from None
    except OSError as exc:
        if exc.errno in (98, 48, 10048):
            raise UsageError(f"port {port} on {host} is in use; choose another with --port") \
                from None
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    port = listener.getsockname()[1]
    app = create_app(review, token, port, allow_remote)
    server = make_server(host, port, app, threaded=True, fd=listener.fileno())
    if allow_remote and not loopback:
        print(f"warning: harvest review listens on {host}: anyone who can reach this machine "
              f"and has the link below can see and change the review", flush=True)
    shown = "127.0.0.1" if loopback else host
    print(f"harvest review: {len(review.records)} records at "
          f"http://{shown}:{port}/?token={token} (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
