"""Local stand-ins for remote services: real HTTP servers on 127.0.0.1 that answer in the
service's wire format. The client libraries under test talk to them over a socket."""

from __future__ import annotations

import base64
import html
import io
import json
import re
import sys
import threading
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from imagegen import make_image
from PIL import Image


class _BackloggedServer(ThreadingHTTPServer):
    # socketserver listens with a backlog of 5: a client opening a connection per request
    # (img2dataset, a burst of retries) overflows it and waits on SYN retransmits, which
    # real hosts (nginx: backlog=4096) do not make it do.
    request_queue_size = 1024


class _QuietServer(_BackloggedServer):
    def handle_error(self, request, client_address):
        # A client that hangs up mid-response (a stopped run) is not the server's error.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class LocalServer:
    """A ThreadingHTTPServer on an ephemeral loopback port, with a request log."""

    def __init__(self, handler_factory, host: str = "127.0.0.1"):
        self.requests: list[tuple[float, str, str, dict]] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in two writes; with Nagle on, the client's delayed
            # ACK adds ~40 ms to every response, which real servers do not.
            disable_nagle_algorithm = True

            def log_message(self, *args):
                pass

            def do_GET(self):
                server._dispatch(self, "GET")

            def do_POST(self):
                server._dispatch(self, "POST")

        self.httpd = _QuietServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.handle = handler_factory
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def _dispatch(self, request: BaseHTTPRequestHandler, method: str):
        length = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(length) if length else b""
        with self.lock:
            self.requests.append((time.monotonic(), method, request.path, dict(request.headers)))
        status, headers, payload = self.handle(method, request.path, dict(request.headers), body)
        request.send_response(status)
        for key, value in headers.items():
            request.send_header(key, value)
        request.send_header("Content-Length", str(len(payload)))
        request.end_headers()
        request.wfile.write(payload)


# flickr.photos.licenses.getInfo as Flickr's API documentation lists it.
FLICKR_GETINFO = {
    0: ("All Rights Reserved", ""),
    1: ("Attribution-NonCommercial-ShareAlike License",
        "https://creativecommons.org/licenses/by-nc-sa/2.0/"),
    2: ("Attribution-NonCommercial License", "https://creativecommons.org/licenses/by-nc/2.0/"),
    3: ("Attribution-NonCommercial-NoDerivs License",
        "https://creativecommons.org/licenses/by-nc-nd/2.0/"),
    4: ("Attribution License", "https://creativecommons.org/licenses/by/2.0/"),
    5: ("Attribution-ShareAlike License", "https://creativecommons.org/licenses/by-sa/2.0/"),
    6: ("Attribution-NoDerivs License", "https://creativecommons.org/licenses/by-nd/2.0/"),
    7: ("No known copyright restrictions", "https://www.flickr.com/commons/usage/"),
    8: ("United States Government Work", "http://www.usa.gov/copyright.shtml"),
    9: ("Public Domain Dedication (CC0)", "https://creativecommons.org/publicdomain/zero/1.0/"),
    10: ("Public Domain Mark", "https://creativecommons.org/publicdomain/mark/1.0/"),
}


@dataclass
class FakePhoto:
    id: str
    title: str = ""
    owner: str = "12345678@N00"
    ownername: str = "Ana Fotógrafa"
    pathalias: str = "ana_photos"
    description: str = ""
    tags: str = ""
    license: str = "4"
    dateupload: int = 1_500_000_000
    datetaken: str = "2017-07-14 02:40:00"
    latitude: float = 0
    longitude: float = 0
    views: int = 10
    sizes: tuple = ("l", "m")
    image: bytes | None = None  # None: generated from the id
    comments: list = field(default_factory=list)  # (author nsid, name, unix date, text)


@dataclass
class FakeFlickr:
    """Flickr's REST endpoint (``/services/rest/``, JSON) plus the image host (``/img/``).

    ``image_script`` maps a photo id to the statuses to answer before the image itself,
    e.g. ``[429, 429]``; ``image_latency`` slows every image response.
    """

    api_key: str = "test-key-0123456789"
    photos: list[FakePhoto] = field(default_factory=list)
    image_script: dict[str, list[int]] = field(default_factory=dict)
    retry_after: str = "1"
    image_latency: float = 0.0
    api_latency: float = 0.0
    content_types: dict[str, str] = field(default_factory=dict)
    api_failures: list[int] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    redirects: dict[str, str] = field(default_factory=dict)  # image path -> Location
    image_headers: dict[str, dict] = field(default_factory=dict)  # photo id -> extra headers
    licenses: dict[int, tuple[str, str]] = field(default_factory=lambda: dict(FLICKR_GETINFO))
    searches: list[dict] = field(default_factory=list)
    host: str = "127.0.0.1"  # another address of this machine's, for other namespaces

    def start(self) -> FakeFlickr:
        self.server = LocalServer(self.handle, self.host).start()
        self.url = self.server.url
        self.endpoint = self.url + "/services/rest/"
        self._images: dict[str, bytes] = {}
        return self

    def stop(self):
        self.server.stop()

    # -- API -----------------------------------------------------------------------------------

    def handle(self, method: str, path: str, headers: dict, body: bytes):
        if path.startswith("/services/rest"):
            return self.api(method, headers, body)
        if path.startswith("/img/"):
            return self.image(path)
        if path.startswith("/photos/"):
            return self.photo_page(path)
        return 404, {"Content-Type": "text/plain"}, b"not found"

    def api(self, method: str, headers: dict, body: bytes):
        params = {k: v[0] for k, v in parse_qs(body.decode("utf-8")).items()}
        self.calls[params.get("method", "?")] += 1
        if self.api_latency:
            time.sleep(self.api_latency)
        if self.api_failures:
            status = self.api_failures.pop(0)
            return status, {"Content-Type": "text/plain", "Retry-After": "0"}, b"busy"
        authorization = headers.get("Authorization", "")
        key = re.search(r'oauth_consumer_key="([^"]*)"', authorization)
        if method != "POST" or key is None or key.group(1) != self.api_key:
            return self.json({"stat": "fail", "code": 100,
                              "message": "Invalid API Key (Key has invalid format)"})
        if params.get("method") == "flickr.photos.licenses.getInfo":
            return self.json({"licenses": {"license": [
                {"id": number, "name": name, "url": url}
                for number, (name, url) in sorted(self.licenses.items())]}, "stat": "ok"})
        photo = next((p for p in self.photos if p.id == params.get("photo_id")), None)
        if params.get("method") in ("flickr.photos.comments.getList", "flickr.photos.getSizes") \
                and photo is None:
            return self.json({"stat": "fail", "code": 1, "message": "Photo not found"})
        if params.get("method") == "flickr.photos.comments.getList":
            return self.json({"comments": {"photo_id": photo.id, "comment": [
                {"id": f"{photo.id}-{i}", "author": nsid, "author_is_deleted": 0,
                 "authorname": name, "realname": "", "datecreate": str(date),
                 "permalink": f"https://www.flickr.com/photos/x/{photo.id}/#comment{i}",
                 "path_alias": "", "_content": text}
                for i, (nsid, name, date, text) in enumerate(photo.comments)]}, "stat": "ok"})
        if params.get("method") == "flickr.photos.getSizes":
            return self.json({"sizes": {"canblog": 0, "candownload": 1, "size": [
                {"label": label, "width": w, "height": h, "media": "photo",
                 "source": f"{self.url}/img/{photo.id}_{size}.jpg",
                 "url": f"https://www.flickr.com/photos/x/{photo.id}/sizes/{size}/"}
                for label, size, w, h in (("Medium", "m", 80, 60), ("Large", "l", 160, 120))
                if size in photo.sizes]}, "stat": "ok"})
        if params.get("method") != "flickr.photos.search":
            return self.json({"stat": "fail", "code": 112,
                              "message": f"Method \"{params.get('method')}\" not found"})
        return self.json(self.search(params))

    def json(self, payload: dict):
        return 200, {"Content-Type": "application/json; charset=utf-8"}, \
            json.dumps(payload).encode("utf-8")

    def search(self, params: dict) -> dict:
        self.searches.append(params)
        text = params.get("text", "").lower()
        tags = [t.lower() for t in params.get("tags", "").split(",") if t]
        low = int(params.get("min_upload_date", 0))
        high = int(params.get("max_upload_date", 2**40))
        licenses = set(params["license"].split(",")) if params.get("license") else None
        bbox = [float(v) for v in params["bbox"].split(",")] if params.get("bbox") else None
        matching = []
        for photo in self.photos:
            haystack = f"{photo.title} {photo.description} {photo.tags}".lower()
            if text and text not in haystack:
                continue
            if tags and not any(t in photo.tags.lower().split() for t in tags):
                continue
            if not low <= photo.dateupload <= high:
                continue
            if licenses is not None and photo.license not in licenses:
                continue
            if bbox and not (bbox[0] <= photo.longitude <= bbox[2]
                             and bbox[1] <= photo.latitude <= bbox[3]):
                continue
            matching.append(photo)
        per_page = min(int(params.get("per_page", 100)), 500)
        total = len(matching)
        pages = max(1, -(-total // per_page))
        page = int(params.get("page", 1))
        # Flickr serves at most 4,000 results per query: later pages repeat earlier ones.
        last_reachable = max(1, 4000 // per_page)
        served_page = min(page, last_reachable)
        chunk = matching[(served_page - 1) * per_page: served_page * per_page]
        extras = params.get("extras", "").split(",")
        return {"photos": {"page": page, "pages": pages, "perpage": per_page, "total": str(total),
                           "photo": [self.photo_json(p, extras) for p in chunk]}, "stat": "ok"}

    def photo_json(self, photo: FakePhoto, extras: list[str]) -> dict:
        data = {"id": photo.id, "owner": photo.owner, "secret": "abc123", "server": "65535",
                "farm": 66, "title": photo.title, "ispublic": 1, "isfriend": 0, "isfamily": 0}
        if "description" in extras:
            data["description"] = {"_content": photo.description}
        if "license" in extras:
            data["license"] = photo.license
        if "date_upload" in extras:
            data["dateupload"] = str(photo.dateupload)
        if "date_taken" in extras:
            data.update(datetaken=photo.datetaken, datetakengranularity=0, datetakenunknown="0")
        if "owner_name" in extras:
            data["ownername"] = photo.ownername
        if "path_alias" in extras:
            data["pathalias"] = photo.pathalias
        if "geo" in extras:
            data.update(latitude=photo.latitude, longitude=photo.longitude,
                        accuracy=16 if photo.latitude or photo.longitude else 0)
        if "tags" in extras:
            data["tags"] = photo.tags
        if "views" in extras:
            data["views"] = str(photo.views)
        dimensions = {"o": (320, 240), "l": (160, 120), "m": (80, 60)}
        for size in photo.sizes:
            if f"url_{size}" in extras:
                width, height = dimensions[size]
                data[f"url_{size}"] = f"{self.url}/img/{photo.id}_{size}.jpg"
                data[f"width_{size}"] = width
                data[f"height_{size}"] = str(height)  # Flickr mixes ints and strings
        return data

    # -- images --------------------------------------------------------------------------------

    def image(self, path: str):
        if path in self.redirects:
            return 302, {"Location": self.redirects[path], "Content-Type": "text/plain"}, b""
        name = urlsplit(path).path.rsplit("/", 1)[-1]
        photo_id, _, size = name.rpartition(".")[0].rpartition("_")
        if self.image_latency:
            time.sleep(self.image_latency)
        script = self.image_script.get(photo_id)
        if script:
            status = script.pop(0)
            headers = {"Content-Type": "text/plain"}
            if status == 429:
                headers["Retry-After"] = self.retry_after
            return status, headers, b"slow down" if status == 429 else b"error"
        photo = self.photo(photo_id)
        if photo is None:
            return 404, {"Content-Type": "text/plain"}, b"no such photo"
        if photo.image is not None:
            data = photo.image
        else:
            if photo_id not in self._images:
                scale = {"o": (320, 240), "l": (160, 120), "m": (80, 60)}[size]
                self._images[photo_id] = make_image(zlib.crc32(photo_id.encode()), size=scale)
            data = self._images[photo_id]
        content_type = self.content_types.get(photo_id, "image/jpeg")
        return 200, {"Content-Type": content_type, **self.image_headers.get(photo_id, {})}, data

    def photo_page(self, path: str):
        """A photo page in the shape harvest reads: comments and the og:image meta."""
        match = re.match(r"/photos/([^/]+)/(\d+)/?$", path)
        photo = next((p for p in self.photos if match and p.id == match.group(2)), None)
        if photo is None:
            return 404, {"Content-Type": "text/html"}, b"<html>not found</html>"
        items = "".join(
            f'<div class="comment-container" id="comment{photo.id}-{i}">'
            f'<a class="comment-author" data-nsid="{html.escape(nsid)}" href="/photos/{nsid}/">'
            f'{html.escape(name)}</a><span class="comment-date" data-timestamp="{date}">'
            f'some time ago</span><div class="comment-content"><p>{html.escape(text)}</p></div>'
            f'<a class="comment-permalink" href="/photos/x/{photo.id}/#comment{i}">link</a></div>'
            for i, (nsid, name, date, text) in enumerate(photo.comments))
        page = (f'<!DOCTYPE html><html><head><meta property="og:image" '
                f'content="{self.url}/img/{photo.id}_l.jpg"><title>{html.escape(photo.title)}'
                f'</title></head><body><div class="comments">{items}</div></body></html>')
        return 200, {"Content-Type": "text/html; charset=utf-8"}, page.encode("utf-8")

    def photo(self, photo_id: str) -> FakePhoto | None:
        index = getattr(self, "_index", None)
        if index is None or len(index) != len(self.photos):
            index = self._index = {p.id: p for p in self.photos}
        return index.get(photo_id)

    def image_requests(self) -> int:
        return sum(1 for _, _, path, _ in self.server.requests if path.startswith("/img/"))


class Served:
    """A fake whose ``handle(method, path, headers, body)`` answers on a LocalServer."""

    def start(self):
        self.server = LocalServer(self.handle).start()
        self.url = self.server.url
        return self

    def stop(self):
        self.server.stop()


@dataclass
class FakeVision(Served):
    """Cloud Vision's REST ``POST /v1/images:annotate``. Labels follow the picture's
    dominant colour: red is a monkey, blue a cage, green a tree (all with primate
    leanings where stated), so tests choose what the "model" sees."""

    api_key: str = "vision-key-0123456789"
    quota_errors: int = 0
    bad_images: set = field(default_factory=set)  # dominant colours answered with an error
    batches: list[int] = field(default_factory=list)
    image_sizes: list[int] = field(default_factory=list)

    LABELS = {
        "red": [("Monkey", 0.93), ("Primate", 0.91), ("Old world monkey", 0.88)],
        "blue": [("Cage", 0.84), ("Metal", 0.7)],
        "green": [("Tree", 0.9), ("Macaque", 0.55)],
    }

    def handle(self, method, path, headers, body):
        if not path.startswith("/v1/images:annotate") or method != "POST":
            return 404, {"Content-Type": "application/json"}, b'{"error": {"code": 404}}'
        if headers.get("x-goog-api-key") != self.api_key:
            return self.error(400, "API key not valid. Please pass a valid API key.",
                              "INVALID_ARGUMENT", reason="API_KEY_INVALID", http=403)
        if self.quota_errors:
            self.quota_errors -= 1
            return self.error(429, "Quota exceeded for quota metric 'Requests'",
                              "RESOURCE_EXHAUSTED")
        requests = json.loads(body)["requests"]
        self.batches.append(len(requests))
        responses = []
        for request in requests:
            assert request["features"][0]["type"] in (4, "LABEL_DETECTION")
            data = base64.b64decode(request["image"]["content"])
            with Image.open(io.BytesIO(data)) as sent:
                self.image_sizes.append(sent.size)
            colour = dominant_colour(data)
            if colour in self.bad_images:
                responses.append({"error": {"code": 3, "message": "Bad image data."}})
                continue
            responses.append({"labelAnnotations": [
                {"mid": f"/m/{i}", "description": name, "score": score, "topicality": score}
                for i, (name, score) in enumerate(self.LABELS.get(colour, [("Sky", 0.6)]))]})
        return 200, {"Content-Type": "application/json; charset=UTF-8"}, \
            json.dumps({"responses": responses}).encode()

    def error(self, code, message, status, reason=None, http=None):
        payload = {"error": {"code": http or code, "message": message, "status": status}}
        if reason:
            payload["error"]["details"] = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                                            "reason": reason}]
        return http or code, {"Content-Type": "application/json"}, json.dumps(payload).encode()


def dominant_colour(data: bytes) -> str:
    with Image.open(io.BytesIO(data)) as image:
        red, green, blue = image.convert("RGB").resize((1, 1)).getpixel((0, 0))
    channel = max((red, "red"), (green, "green"), (blue, "blue"))
    return channel[1]


@dataclass
class FakeBing(Served):
    """Bing's ``/images/async`` result pages (HTML in Bing's markup), ``/robots.txt`` and the
    v7 ``/v7.0/images/search`` JSON API. ``results`` maps a query text to its results."""

    results: dict[str, list[dict]] = field(default_factory=dict)
    robots: str = "User-agent: *\nDisallow: /search\nAllow: /images/async\n"
    api_key: str = "bing-key-0123456789"
    requests: list[dict] = field(default_factory=list)

    def handle(self, method, path, headers, body):
        parts = urlsplit(path)
        params = {k: v[0] for k, v in parse_qs(parts.query).items()}
        if parts.path == "/robots.txt":
            return 200, {"Content-Type": "text/plain"}, self.robots.encode()
        self.requests.append({"path": parts.path, "time": time.monotonic(), **params})
        if parts.path == "/images/async":
            return 200, {"Content-Type": "text/html; charset=utf-8"}, self.page(params).encode()
        if parts.path == "/v7.0/images/search":
            if headers.get("Ocp-Apim-Subscription-Key") != self.api_key:
                return 401, {"Content-Type": "application/json"}, json.dumps(
                    {"error": {"code": "401", "message": "Access denied due to invalid "
                                                          "subscription key."}}).encode()
            return 200, {"Content-Type": "application/json"}, json.dumps(self.api(params)).encode()
        return 404, {"Content-Type": "text/plain"}, b"not found"

    def page(self, params) -> str:
        results = self.results.get(params["q"], [])
        count, first = int(params.get("count", 35)), int(params.get("first", 1))
        if first > len(results) and results:
            first = max(1, len(results) - count + 1)  # Bing repeats its last page
        items = []
        for result in results[first - 1: first - 1 + count]:
            if result.get("broken") == "json":
                meta = '{"murl": "http://broken'
            elif result.get("broken") == "no-murl":
                meta = json.dumps({"purl": "http://example.org/page", "t": "no image"})
            elif result.get("broken") == "javascript":
                meta = json.dumps({"murl": "javascript:alert(1)", "t": "bad scheme"})
            else:
                meta = json.dumps({"cid": "x", "purl": result["purl"], "murl": result["murl"],
                                   "turl": result["murl"] + "?thumb", "t": result["title"],
                                   "md5": "0"}, ensure_ascii=False)
            size = (f'<div class="img_info hon"><span class="nowrap">{result.get("w", 640)} × '
                    f'{result.get("h", 480)} · {result.get("fmt", "jpeg")}</span>'
                    f'<div class="lnkw"><a>example.org</a></div></div>')
            items.append(f'<li data-idx="1"><div class="iuscp isv"><div class="imgpt">'
                         f'<a class="iusc" m="{html.escape(meta, quote=True)}" '
                         f'href="/images/search?view=detailV2"><div class="img_cont hoff">'
                         f'<img class="mimg" alt="x"></div></a>{size}</div></div></li>')
        return ('<!DOCTYPE html><html><body><ul class="dgControl_list">' + "".join(items)
                + "</ul></body></html>")

    def api(self, params) -> dict:
        results = [r for r in self.results.get(params["q"], []) if not r.get("broken")]
        offset, count = int(params.get("offset", 0)), int(params.get("count", 35))
        chunk = results[offset: offset + count]
        return {"_type": "Images", "totalEstimatedMatches": len(results),
                "nextOffset": offset + len(chunk),
                "value": [{"name": r["title"], "contentUrl": r["murl"], "hostPageUrl": r["purl"],
                           "thumbnailUrl": r["murl"] + "?thumb", "width": r.get("w", 640),
                           "height": r.get("h", 480), "encodingFormat": "jpeg",
                           "datePublished": "2024-05-01T10:00:00.0000000Z"} for r in chunk]}


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler for the tests' small servers: one call per reply, no log lines."""

    def reply(self, status: int, body: bytes = b"", content_type: str = "text/plain",
              headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def reply_json(self, body, status: int = 200, headers: dict | None = None) -> None:
        self.reply(status, json.dumps(body).encode(), "application/json", headers)

    def log_message(self, *args):
        pass


def serve_in_thread(handler: type[BaseHTTPRequestHandler]) -> tuple[ThreadingHTTPServer, str]:
    """A threading HTTP server on a free 127.0.0.1 port, and its base URL."""
    server = _BackloggedServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"
