"""``harvest review``: a local web page to choose score thresholds and curate a harvest.

The page (``static/review.html``, plain HTML and JavaScript, no build step) talks to a
small Flask app. Manual keep/reject decisions and thresholds are written to
``.harvest/review.sqlite`` as soon as they are made; "Save" also writes
``review-recipe.yml`` (the thresholds as a recipe snippet) and ``.harvest/review.json``,
which ``harvest export`` applies.
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import socket
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from .crypto import ENCRYPTED, FieldCipher, Keyring
from .curation import verdict
from .dataset import read_records
from .errors import UsageError

log = logging.getLogger("harvest.review")
THUMB_SIDE = 256
BINS = 20
FACETS = ("source", "term", "lang", "license", "country", "city")
STATIC = Path(__file__).parent / "static"


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
        for record in read_records(path):
            file_info = record.get("file") or {}
            if not file_info.get("sha256") or record.get("duplicate_of"):
                continue
            if not (self.output / file_info["path"]).is_file():
                self.missing += 1  # export leaves it out: so does the page
                continue
            encrypted = set((record.get(ENCRYPTED) or {}).get("fields", []))
            if self.cipher is not None and encrypted:
                record = self.cipher.decrypt(record)
                encrypted = set()
            record["_encrypted_fields"] = sorted(encrypted)
            self.records.append(record)
            self.by_id[record["id"]] = record
            self.by_sha[file_info["sha256"]] = self.output / file_info["path"]
        self.terms = sorted({term for r in self.records for term in (r.get("scores") or {})})

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
        keep_if = {}
        for term, rule in sorted(thresholds.items()):
            value, above = float(rule.get("value", 0)), rule.get("direction", "above") == "above"
            if rule.get("enabled", True) and not (above and value <= 0):  # >=0 keeps all
                keep_if[term] = f"{'>=' if above else '<'}{value:g}"
        snippet = self.output / "review-recipe.yml"
        snippet.write_text("# Thresholds chosen in `harvest review`; paste under the scorer's "
                           "options.\n" + yaml.safe_dump({"keep_if": keep_if},
                                                         allow_unicode=True, sort_keys=True),
                           encoding="utf-8")
        return {"snippet": str(snippet), "decisions": str(len(decisions))}

    # -- views -----------------------------------------------------------------------------

    def meta(self) -> dict[str, Any]:
        facets: dict[str, dict[str, int]] = {name: {} for name in FACETS}
        for record in self.records:
            for name in FACETS:
                value = record.get(name)
                if value not in (None, ""):
                    facets[name][str(value)] = facets[name].get(str(value), 0) + 1
        return {"terms": self.terms, "facets": facets, "total": len(self.records),
                "thresholds": self.thresholds(), "bins": BINS, "missing": self.missing}

    def store_thresholds(self, thresholds: dict[str, dict]) -> None:
        """Every change applies at once: what the page shows is what export writes."""
        with self.lock:
            self.db.execute("BEGIN")
            self.db.execute("DELETE FROM thresholds")
            self.db.executemany("INSERT INTO thresholds VALUES (?, ?)",
                                [(t, json.dumps(r)) for t, r in thresholds.items()])
            self.db.execute("COMMIT")

    def view(self, query: dict) -> dict[str, Any]:
        filters = {k: v for k, v in (query.get("filters") or {}).items() if v not in (None, "")}
        thresholds = query.get("thresholds") or {}
        if thresholds != self.thresholds():
            self.store_thresholds(thresholds)
        show = query.get("show", "all")
        offset, limit = int(query.get("offset", 0)), min(int(query.get("limit", 120)), 1000)
        decisions = self.decisions()
        histograms = {term: [0] * BINS for term in self.terms}
        kept = dropped = 0
        items = []
        for record in self.records:
            if any(str(record.get(name)) != value for name, value in filters.items()):
                continue
            scores = record.get("scores") or {}
            for term in self.terms:
                score = float(scores.get(term, 0.0))
                histograms[term][min(BINS - 1, int(score * BINS))] += 1
            is_kept, manual = verdict(record, thresholds, decisions)
            kept += is_kept
            dropped += not is_kept
            if show == "kept" and not is_kept or show == "dropped" and is_kept:
                continue
            items.append((record, is_kept, manual))
        page = [{"id": r["id"], "sha": r["file"]["sha256"], "title": r.get("title") or "",
                 "kept": k, "manual": m, "scores": r.get("scores") or {}}
                for r, k, m in items[offset: offset + limit]]
        return {"kept": kept, "dropped": dropped, "matching": kept + dropped,
                "shown": len(items), "histograms": histograms, "items": page,
                "offset": offset}

    def detail(self, record_id: str) -> dict[str, Any]:
        record = self.by_id[record_id]
        decision = self.decisions().get(record_id)
        hidden = set(record.get("_encrypted_fields", []))
        fields = {k: ("(encrypted: start the review with --key-file to see it)"
                      if k in hidden else v)
                  for k, v in record.items() if not k.startswith("_") and k != "exif"}
        return {"record": fields, "decision": decision, "sha": record["file"]["sha256"]}

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

    app = Flask(__name__, static_folder=None)
    hosts = {f"{name}:{port}" for name in LOOPBACK_NAMES}

    @app.before_request
    def guard():
        if not allow_remote and request.host not in hosts:
            return jsonify({"error": "wrong Host: open the address harvest review printed"}), 403
        given = request.headers.get("X-Harvest-Token") or request.args.get("token") or ""
        if not hmac.compare_digest(given.encode(), token.encode()):
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
        return jsonify(review.view(request.get_json() or {}))

    @app.get("/api/record/<path:record_id>")
    def detail(record_id):
        if record_id not in review.by_id:
            abort(404)
        return jsonify(review.detail(record_id))

    @app.post("/api/decision")
    def decide():
        body = request.get_json() or {}
        if body.get("decision") not in ("keep", "reject", "none"):
            return jsonify({"error": "decision must be keep, reject or none"}), 400
        try:
            review.decide(str(body.get("id")), body["decision"])
        except KeyError:
            return jsonify({"error": "no such record"}), 404
        return jsonify({"ok": True})

    @app.post("/api/save")
    def save():
        body = request.get_json() or {}
        return jsonify(review.save(body.get("thresholds") or {}))

    @app.get("/thumb/<sha>")
    def thumb(sha):
        path = review.thumbnail(sha)
        if path is None:
            return PLACEHOLDER, 200, {"Content-Type": "image/svg+xml"}
        return send_file(path, mimetype="image/jpeg", max_age=86400)

    @app.get("/image/<sha>")
    def image(sha):
        path = review.by_sha.get(sha)
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
