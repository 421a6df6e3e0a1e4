"""Hostile servers and URL lists: address tricks, local files, odd schemes, servers that
drip, stall or ask to be retried tomorrow. Each is refused or bounded, and logs say why."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import REPO, read_jsonl
from imagegen import make_image

from harvest.core.download.fetch import refuse_private
from harvest.core.errors import RecordError

HARVEST = os.path.join(os.path.dirname(sys.executable), "harvest")


class RawServer:
    """A loopback TCP server whose replies are scripted byte by byte, logging requests."""

    def __init__(self, behaviours: dict):
        self.behaviours = behaviours
        self.requests: list[str] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.stopping = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _accept(self):
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                data += chunk
            path = data.split(b" ", 2)[1].decode()
            self.requests.append(path)
            try:
                self.behaviours.get(path.split("?")[0], not_found)(conn)
            except OSError:
                pass

    def close(self):
        self.stopping = True
        self.sock.close()


JPEG = make_image(1)


def not_found(conn):
    """What any web server answers for a file it does not have (robots.txt here)."""
    conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")


def ok(conn):
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: "
                 + str(len(JPEG)).encode() + b"\r\nConnection: close\r\n\r\n" + JPEG)


def drip_body(conn):
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: "
                 + str(len(JPEG)).encode() + b"\r\n\r\n")
    for byte in JPEG:
        conn.sendall(bytes([byte]))
        time.sleep(0.2)


def drip_headers(conn):
    conn.sendall(b"HTTP/1.1 200 OK\r\n")
    for _ in range(100_000):
        conn.sendall(b"X")
        time.sleep(0.2)


def to_local_file(conn):
    conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: file:///etc/passwd\r\n"
                 b"Content-Length: 0\r\n\r\n")


def to_gopher(conn):
    conn.sendall(b"HTTP/1.1 301 Moved\r\nLocation: gopher://127.0.0.1:70/x\r\n"
                 b"Content-Length: 0\r\n\r\n")


def retry_tomorrow(conn):
    conn.sendall(b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 99999\r\n"
                 b"Content-Length: 0\r\n\r\n")
    time.sleep(1)


@pytest.fixture
def raw_server():
    server = RawServer({"/ok.jpg": ok, "/drip-body.jpg": drip_body,
                        "/drip-headers.jpg": drip_headers, "/retry.jpg": retry_tomorrow,
                        "/to-file.jpg": to_local_file, "/to-gopher.jpg": to_gopher})
    yield server
    server.close()


def run_list(harvest, recipe_file, tmp_path, urls, run: dict | None = None, name: str = "out"):
    (tmp_path / "list.txt").write_text("\n".join(urls) + "\n", encoding="utf-8")
    output = tmp_path / name
    recipe = recipe_file(f"""
terms: [x]
output: {output}
run: {json.dumps({"rate_per_host": 1000, "retries": 1, "backoff": 0.01, **(run or {})})}
sources: [{{use: urls, options: {{path: list.txt}}}}]
""")
    status, out, err = harvest("run", recipe, "--no-progress")
    summary = json.loads((output / ".harvest" / "last-run.json").read_text())
    reasons = {f["reason"]: f["count"] for f in summary["failures"]}
    return status, out + err, summary, reasons, output


ADDRESS_TRICKS = [
    # urllib.parse reads the host as 8.8.8.8 (public), urllib3 connects to 127.0.0.1.
    "{base}\\@8.8.8.8/ok.jpg",
    "http://[::127.0.0.1]:{port}/ok.jpg",          # IPv4-compatible IPv6
    "http://[::ffff:127.0.0.1]:{port}/ok.jpg",     # IPv4-mapped
    "http://[::ffff:0:7f00:1]:{port}/ok.jpg",      # IPv4-translated (SIIT)
    "http://[64:ff9b::7f00:1]:{port}/ok.jpg",      # NAT64 well-known prefix
    "http://[64:ff9b:1::7f00:1]:{port}/ok.jpg",    # NAT64 local-use prefix
    "http://[2002:7f00:1::1]:{port}/ok.jpg",       # 6to4 of 127.0.0.1
    "http://[2001:0:4136:e378:8000:63bf:80ff:fffe]:{port}/ok.jpg",  # Teredo, client 127.0.0.1
    "http://0x7f.1:{port}/ok.jpg", "http://2130706433:{port}/ok.jpg", "http://127.1:{port}/ok.jpg",
    "http://0:{port}/ok.jpg", "http://[::]:{port}/ok.jpg", "http://100.64.0.1:{port}/ok.jpg",
    "http://224.0.0.1:{port}/ok.jpg", "http://LocalHost:{port}/ok.jpg",
]


def test_address_tricks_are_refused_and_reach_nothing(raw_server, harvest, recipe_file, tmp_path):
    port = raw_server.base.rsplit(":", 1)[1]
    urls = [u.format(base=raw_server.base, port=port) for u in ADDRESS_TRICKS]
    status, _, summary, reasons, output = run_list(harvest, recipe_file, tmp_path, urls)
    assert raw_server.requests == []
    assert summary["totals"]["stored"] == 0
    # Every one is a permanent refusal, not a transient failure retried on every run.
    assert summary["totals"]["rejected"] == len(urls), reasons
    assert all(r.startswith(("refused:", "bad URL:")) for r in reasons), reasons


def test_the_connection_itself_refuses_a_private_peer(raw_server, harvest, recipe_file, tmp_path,
                                                      monkeypatch):
    """A name that resolves to a public address when checked and to loopback when
    connected (DNS rebinding) is caught on the socket, before any request is sent."""
    import harvest.core.download.fetch as fetch

    real = socket.getaddrinfo

    def lying(host, *args, **kwargs):
        if host == "localhost":
            return real("8.8.8.8", *args, **kwargs)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(fetch.socket, "getaddrinfo", lying)
    with pytest.raises(RecordError):
        refuse_private("http://127.0.0.1/")  # the lie is only for localhost
    refuse_private("http://localhost/")  # the name check is fooled...
    monkeypatch.setattr(fetch.socket, "getaddrinfo", real)
    port = raw_server.base.rsplit(":", 1)[1]

    def fooled_check(url):
        pass

    monkeypatch.setattr(fetch, "refuse_private", fooled_check)
    # Threads in this process (workers: 1): the patched check is this process's.
    status, _, summary, reasons, _ = run_list(harvest, recipe_file, tmp_path,
                                              [f"http://localhost:{port}/ok.jpg"],
                                              run={"workers": 1})
    assert raw_server.requests == []  # ...the connection is not
    assert list(reasons) == ["refused: localhost resolves to non-public address 127.0.0.1 "
                             "(run.allow_private_addresses allows it)"]


def test_file_urls_are_refused_unless_allowed(harvest, recipe_file, tmp_path):
    image = tmp_path / "local.jpg"
    image.write_bytes(JPEG)
    urls = [image.as_uri(), "file:///etc/passwd", "file:///no/such/file.jpg"]
    status, _, summary, reasons, output = run_list(harvest, recipe_file, tmp_path, urls)
    # Refused alike: the reasons must not tell which local files exist.
    assert reasons == {"refused: file: URL (run.allow_file_urls allows it)": 3}
    assert summary["totals"]["rejected"] == 3
    assert not (output / "records.jsonl").read_text()

    status, _, summary, reasons, output = run_list(
        harvest, recipe_file, tmp_path, [image.as_uri()], run={"allow_file_urls": True},
        name="allowed")
    assert summary["totals"]["stored"] == 1


@pytest.mark.parametrize("url", ["ftp://example.org/a.jpg", "gopher://example.org/a.jpg",
                                 "data:image/png;base64,iVBORw0KGgo=", "javascript:alert(1)",
                                 "//example.org/a.jpg"])
def test_other_schemes_are_a_permanent_rejection(url, harvest, recipe_file, tmp_path):
    status, _, summary, reasons, _ = run_list(harvest, recipe_file, tmp_path, [url])
    assert summary["totals"]["rejected"] == 1 and summary["totals"]["failed"] == 0, reasons
    [reason] = reasons
    assert reason.startswith("refused:") and "scheme" in reason


def test_drips_and_endless_retry_after_are_bounded(raw_server, harvest, recipe_file, tmp_path):
    urls = [f"{raw_server.base}/{name}" for name in
            ("drip-body.jpg", "drip-headers.jpg", "retry.jpg", "ok.jpg")]
    started = time.monotonic()
    status, _, summary, reasons, output = run_list(
        harvest, recipe_file, tmp_path, urls,
        run={"allow_private_addresses": True, "download_deadline": 2, "max_retry_after": 30,
             "timeout": 5})
    assert time.monotonic() - started < 15
    assert summary["totals"]["stored"] == 1
    assert reasons == {"took longer than run.download_deadline (2 s)": 2,
                       "server asked to retry after 99999 s, more than run.max_retry_after "
                       "(30 s)": 1}
    assert summary["totals"]["failed"] == 3  # transient: the next run tries them again
    assert [r["url"] for r in read_jsonl(output / "records.jsonl")] == [urls[-1]]


def hang(conn):
    time.sleep(3600)


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_ends_the_process_even_with_downloads_stuck(how, raw_server, recipe_file,
                                                           tmp_path, isolated_home):
    raw_server.behaviours["/hang.jpg"] = hang
    urls = [f"{raw_server.base}/ok.jpg?n={i}" for i in range(6)]
    urls += [f"{raw_server.base}/hang.jpg?n={i}" for i in range(8)]
    (tmp_path / "list.txt").write_text("\n".join(urls) + "\n")
    output = tmp_path / "out"
    recipe = recipe_file(f"""
terms: [x]
output: {output}
run: {{allow_private_addresses: true, rate_per_host: 1000, batch_size: 1, concurrency: 4,
       timeout: 600, download_deadline: 3600}}
sources: [{{use: urls, options: {{path: list.txt}}}}]
""")
    process = subprocess.Popen([HARVEST, "run", str(recipe), "--no-progress"],
                               env=dict(os.environ, HOME=str(isolated_home)),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while sum(1 for p in raw_server.requests if p.startswith("/hang")) < 4:
        assert time.monotonic() < deadline and process.poll() is None, process.communicate()
        time.sleep(0.05)
    asked = time.monotonic()
    process.send_signal(how)
    out, err = process.communicate(timeout=30)
    assert time.monotonic() - asked < 5, err
    assert process.returncode == 130, err
    assert "interrupted" in out
    assert len(read_jsonl(output / "records.jsonl")) == 6


def test_terms_and_reasons_cannot_drive_the_terminal(harvest, recipe_file, tmp_path):
    evil = "\x1b[2J\x1b[31mowned\rfake line\n\u202eevil" + "x" * 500
    (tmp_path / "list.jsonl").write_text(json.dumps({"url": "ftp://h/a.jpg", "term": evil}),
                                         encoding="utf-8")
    output = tmp_path / "out"
    recipe = recipe_file(f"""
name: "bad\\x1b[0m name"
terms: [x]
output: {output}
sources: [{{use: urls, options: {{path: list.jsonl}}}}]
""")
    status, out, err = harvest("run", recipe, "--no-progress")
    assert status == 0, err
    assert "\x1b" not in out and "\r" not in out and "\u202e" not in out
    assert "\\x1b[2J\\x1b[31mowned\\x0dfake line\\x0a\\u…" in out  # cut at 40 columns
    assert max(len(line) for line in out.splitlines()) < 400


def test_secrets_in_paths_and_endpoints_reach_no_output(flickr, recipe_file, harvest, tmp_path,
                                                        monkeypatch):
    """A ${NAME} used in a path or an endpoint is as secret as an API key: it appears in
    no file of the output, no printout and no error."""
    from conftest import monkey_photos

    secret = "S3cr3tPlace9"
    folder = tmp_path / secret
    folder.mkdir()
    for name in ("animal-00.jpg", "animal-01.jpg"):
        (folder / name).write_bytes((REPO / "configs/demo-images/animals" / name).read_bytes())
    (folder / "broken.jpg").write_bytes(JPEG[:300])
    flickr.photos = monkey_photos(3)
    monkeypatch.setenv("SECRET_DIR", str(folder))
    monkeypatch.setenv("SECRET_MISSING", str(tmp_path / secret / "nothing-here"))
    # A host that does not resolve: the error quotes the host alone, not the whole value.
    endpoint_secret = secret.lower() + ".localhost"
    monkeypatch.setenv("SECRET_ENDPOINT", flickr.endpoint.replace("127.0.0.1", endpoint_secret))
    monkeypatch.setenv("SECRET_NUMBER", secret)
    output = tmp_path / "out"
    recipe = recipe_file(f"""
terms: [monkey]
output: {output}
run: {{allow_private_addresses: true, rate_per_host: 1000, retries: 1, backoff: 0.01}}
sources:
  - {{use: folder, options: {{path: "${{SECRET_DIR}}"}}}}
  - {{use: flickr, options: {{endpoint: "${{SECRET_ENDPOINT}}"}}}}
""")
    status, out, err = harvest("run", recipe, "--no-progress")
    printed = out + err
    assert secret not in printed and endpoint_secret not in printed
    for path in output.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert secret.encode() not in data and endpoint_secret.encode() not in data, path
    assert "***" in printed  # the reasons are there, with the secret replaced

    for option, shown in (("per_page", "(got '${SECRET_NUMBER}')"),
                          ("path", "no such folder: ${SECRET_MISSING}")):
        plugin = "flickr" if option == "per_page" else "folder"
        variable = "SECRET_NUMBER" if option == "per_page" else "SECRET_MISSING"
        bad = recipe_file(f"""
terms: [monkey]
output: {output}
sources: [{{use: {plugin}, options: {{{option}: "${{{variable}}}"}}}}]
""", name="bad.yml")
        status, out, err = harvest("validate", bad)
        assert status == 2 and secret not in out + err
        assert shown in err, err


@pytest.mark.parametrize("workers", [1, 2])
def test_decodes_share_a_memory_budget(workers, raw_server, recipe_file, tmp_path,
                                       isolated_home):
    """Sixteen PNGs of 6000 x 6000 RGBA (144 MB each once decoded, a few hundred KB on the
    wire) fetched at once: without a budget the decodes need 2.3 GB together; with
    decode_memory 300MB the run peaks far below that: sixteen threads in one process, or
    two worker processes that each get half the budget (counted as the main process's
    peak plus twice the larger worker's)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGBA", (6000, 6000), (10, 200, 30, 128)).save(buffer, "PNG", compress_level=1)
    big = buffer.getvalue()

    def big_png(conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: "
                     + str(len(big)).encode() + b"\r\nConnection: close\r\n\r\n" + big)

    raw_server.behaviours["/big.png"] = big_png
    (tmp_path / "list.txt").write_text("".join(f"{raw_server.base}/big.png?n={i}\n"
                                               for i in range(16)))
    output = tmp_path / "out"
    recipe = recipe_file(f"""
terms: [x]
output: {output}
run: {{allow_private_addresses: true, rate_per_host: 1000, concurrency: 16,
       decode_memory: 300MB, workers: {workers}}}
sources: [{{use: urls, options: {{path: list.txt}}}}]
""")
    measure = ("import resource, sys\nfrom harvest.core.commands.cli import main\n"
               f"status = main(['run', {str(recipe)!r}, '--no-progress'])\n"
               "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
               "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
               "sys.exit(status)\n")
    # Through a shell that forks: Linux keeps a process's peak RSS across exec, and a child
    # spawned straight from this test process would report this process's size (which
    # grows as the suite loads models) as its own peak.
    done = subprocess.run(["/bin/sh", "-c", '"$0" -c "$1"; exit $?', sys.executable, measure],
                          capture_output=True, text=True,
                          env=dict(os.environ, HOME=str(isolated_home)), timeout=300)
    assert done.returncode == 0, done.stderr
    own, children = (int(x) / 1024 for x in done.stderr.split("MAXRSS")[1].split()[:2])
    peak_mb = own + (workers * children if workers > 1 else 0)
    assert len(read_jsonl(output / "records.jsonl")) == 16
    # Each process carries its own interpreter (~60 MB) beside its share; unbounded, the
    # decodes alone take over 2 GB in either case.
    assert peak_mb < (700 if workers == 1 else 1000), peak_mb


def test_a_redirect_to_another_scheme_is_refused(raw_server, harvest, recipe_file, tmp_path):
    """Even where private addresses are allowed: a redirect hop is http or https, never a
    local file (whatever run.allow_file_urls says) or another protocol."""
    urls = [f"{raw_server.base}/to-file.jpg", f"{raw_server.base}/to-gopher.jpg"]
    status, _, summary, reasons, _ = run_list(
        harvest, recipe_file, tmp_path, urls,
        run={"allow_private_addresses": True, "allow_file_urls": True})
    assert reasons == {"refused: redirect to a file URL (only http and https)": 1,
                       "refused: redirect to a gopher URL (only http and https)": 1}
    assert summary["totals"]["rejected"] == 2


def test_a_hostile_robots_txt_is_bounded(harvest, recipe_file, tmp_path):
    """A robots.txt that drips forever, or is a gigabyte of rules: the image's download
    deadline covers it, at most 512 KiB of it is read, and the run ends in time."""
    def endless_rules(conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        line = b"Disallow: /nothing-here-" + b"x" * 64 + b"\n"
        for _ in range(20_000_000 // len(line)):
            conn.sendall(line)

    for robots, expected in ((drip_headers, "disallowed for now"), (endless_rules, None)):
        server = RawServer({"/robots.txt": robots, "/ok.jpg": ok})
        started = time.monotonic()
        status, out, summary, reasons, _ = run_list(
            harvest, recipe_file, tmp_path, [f"{server.base}/ok.jpg"],
            {"allow_private_addresses": True, "download_deadline": 3, "timeout": 2},
            name=f"out-{robots.__name__}")
        server.close()
        assert time.monotonic() - started < 30
        if expected:
            assert status == 3 and any(expected in reason or "took longer" in reason
                                       for reason in reasons), reasons
        else:
            assert status == 0 and summary["totals"]["stored"] == 1, reasons


def test_an_api_host_that_does_not_resolve_fails_fast_in_one_line(recipe_file, harvest,
                                                                  tmp_path, monkeypatch):
    """Offline, every search failed after run.retries lookups with a growing backoff (15 s
    a term) and printed urllib3's 300-character chain. A name that does not resolve is
    tried three times quickly, then not again for each later term; one short line says it.
    Names under .invalid never resolve (RFC 6761); the resolver is made to answer so at
    once, so the test does not depend on this machine's DNS."""
    real_getaddrinfo = socket.getaddrinfo
    lookups: list[str] = []

    def getaddrinfo(host, *args, **kwargs):
        if isinstance(host, str) and host.endswith(".invalid"):
            lookups.append(host)
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    recipe = recipe_file(f"""
terms: [monkey, cat, dog]
output: {tmp_path / 'out'}
sources:
  - use: openverse
    options: {{endpoint: "https://api.openverse.invalid"}}
  - use: wikimedia
    options: {{endpoint: "https://commons.wikimedia.invalid/w/api.php", contact: me@example.org}}
""")
    started = time.monotonic()
    status, out, err = harvest("run", recipe, "--no-progress")
    took = time.monotonic() - started
    assert status == 3
    assert took < 8, took  # it was 15 s a term and source
    for label, host in (("openverse", "api.openverse.invalid"),
                        ("wikimedia", "commons.wikimedia.invalid")):
        said = f"cannot resolve {host}: is the network up?"
        # The summary counts it for each term; the terminal says it once.
        assert f"3  {label} search: {said}" in out
        assert [line for line in err.splitlines() if host in line] == [
            f"ERROR harvest.engine: {label}: search 'monkey' failed: {said}"]
        # Three quick tries for the first term, one lookup for each later one.
        assert lookups.count(host) == 3 + 2, lookups
    assert "urllib3" not in out + err and "ConnectionPool" not in out + err
    assert max(len(line) for line in (out + err).splitlines()) < 200
