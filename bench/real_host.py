"""harvest, img2dataset and curl against nginx over HTTP and HTTPS, side by side in one run.

    python bench/real_host.py               # 10,000 small + 3,000 photos, HTTP and HTTPS, 2 rounds
    python bench/real_host.py --small 50 --photos 0 --schemes http --tools harvest,curl --rounds 1

The image host is nginx (Debian's ``nginx-light``; installed with apt-get when missing and
this runs as root) serving distinct JPEGs from disk on 127.0.0.1, with keep-alive and a
listen backlog of 4096 as real image hosts have: Python's ThreadingHTTPServer (backlog 5)
stalls a client that opens a connection per image on SYN retransmits, so it is no stand-in
for a host in a speed comparison. HTTPS uses a throwaway self-signed certificate, trusted
through ``SSL_CERT_FILE`` by harvest (urllib3) and img2dataset (urllib), ``--cacert`` by
curl.

Two kinds of picture: ``small`` (160x120, about 3 KB, where per-request costs dominate) and
``photo`` (640x480, gradients and noise, about 55 KB). Per case (scheme x kind) and round,
in an order that rotates each round:

- **harvest**: ``harvest run`` on a recipe with the ``urls`` source and the JSONL sink, its
  defaults except ``concurrency`` (64, as the others), ``rate_per_host`` (no pacing against
  the one local host) and ``allow_private_addresses`` (127.0.0.1);
- **img2dataset** 1.47 in a virtual environment of its own (made with pip when missing),
  ``--output_format files --resize_mode no --disable_all_reencoding True
  --processes_count 2 --thread_count 64``, a new output folder per run,
  ``NO_ALBUMENTATIONS_UPDATE=1`` so that nothing leaves the machine;
- **curl** as the floor: ``curl -s --fail --parallel --parallel-max 64 -K cfg`` (libcurl's
  multi interface in C, connections reused).

Each tool is a child process timed with ``os.wait4``: wall time and CPU seconds of its whole
process tree (its own and its waited-for workers'), peak RSS summed over the tree. Every run
must have stored all N files with the served bytes (counted on disk): a run that did not
fails the bench rather than report the speed of failures. nginx's own CPU per image is
printed beside each run, and curl's speed against the others shows whether the server, not
the tool, was the bound.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import tree_rss_mb  # noqa: E402  (bench/run.py, beside this file)

IMG2DATASET = "img2dataset==1.47.0"
TOOLS = ("harvest", "img2dataset", "curl")
KINDS = ("small", "photo")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# -- the pictures -----------------------------------------------------------------------------

def _noise(rng: random.Random, size: tuple[int, int]):
    from PIL import Image

    return Image.frombytes("L", size, rng.randbytes(size[0] * size[1]))


def small_jpeg(seed: int) -> bytes:
    """160x120, a flat colour with a little noise: about 3 KB, distinct per seed."""
    from PIL import Image

    rng = random.Random(seed)
    base = Image.new("RGB", (160, 120), tuple(rng.randrange(256) for _ in range(3)))
    grain = _noise(rng, (160, 120))
    image = Image.blend(base, Image.merge("RGB", [grain] * 3), 0.05)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85)
    return out.getvalue()


def photo_jpeg(seed: int) -> bytes:
    """640x480 with gradients, grain and shapes: about 55 KB, as a camera photo compresses."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = random.Random(1_000_000 + seed)
    width, height = 640, 480
    gradient = Image.linear_gradient("L")
    bands = [gradient.rotate(rng.randrange(360)).resize((width, height)) for _ in range(3)]
    grain = _noise(rng, (width, height)).filter(ImageFilter.BoxBlur(1))
    image = Image.merge("RGB", [Image.blend(band, grain, 0.3) for band in bands])
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = rng.randrange(width), rng.randrange(height)
        draw.ellipse((x, y, x + rng.randrange(20, 200), y + rng.randrange(20, 200)),
                     fill=tuple(rng.randrange(256) for _ in range(3)))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85)
    return out.getvalue()


def write_site(root: Path, counts: dict[str, int]) -> dict[str, dict]:
    """The files nginx serves: ``root/KIND/INDEX.jpg``; per kind, the count and total bytes."""
    site = {}
    for kind, count in counts.items():
        if not count:
            continue
        make = small_jpeg if kind == "small" else photo_jpeg
        folder = root / kind
        folder.mkdir(parents=True)
        total = 0
        for index in range(count):
            data = make(index)
            (folder / f"{index}.jpg").write_bytes(data)
            total += len(data)
        site[kind] = {"count": count, "bytes": total}
    return site


# -- nginx ------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ensure_nginx() -> str:
    found = shutil.which("nginx") or next(
        (path for path in ("/usr/sbin/nginx", "/sbin/nginx") if os.path.exists(path)), None)
    if found:
        return found
    if os.geteuid() != 0:
        raise SystemExit("nginx is not installed (apt-get install -y nginx-light)")
    print("installing nginx-light...", flush=True)
    subprocess.run(["apt-get", "install", "-y", "-q", "nginx-light"], check=True,
                   env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    return shutil.which("nginx") or "/usr/sbin/nginx"


def make_certificate(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


class Nginx:
    """nginx in the foreground under a prefix of its own, on free loopback ports."""

    def __init__(self, binary: str, prefix: Path, root: Path, certificate: tuple[Path, Path],
                 workers: int):
        self.ports = {"http": free_port(), "https": free_port()}
        cert, key = certificate
        for name in ("logs", "temp"):
            (prefix / name).mkdir(exist_ok=True)
        temp = prefix / "temp"
        self.conf = prefix / "nginx.conf"
        self.conf.write_text(textwrap.dedent(f"""
            daemon off;
            worker_processes {workers};
            pid {prefix / "nginx.pid"};
            error_log {prefix / "logs" / "error.log"} warn;
            events {{ worker_connections 8192; }}
            http {{
                access_log off;
                sendfile on;
                tcp_nopush on;
                keepalive_timeout 65;
                keepalive_requests 1000000;
                types {{ image/jpeg jpg; }}
                client_body_temp_path {temp / "body"};
                proxy_temp_path {temp / "proxy"};
                fastcgi_temp_path {temp / "fastcgi"};
                uwsgi_temp_path {temp / "uwsgi"};
                scgi_temp_path {temp / "scgi"};
                server {{
                    listen 127.0.0.1:{self.ports["http"]} backlog=4096;
                    listen 127.0.0.1:{self.ports["https"]} ssl backlog=4096;
                    ssl_certificate {cert};
                    ssl_certificate_key {key};
                    ssl_session_cache shared:SSL:10m;
                    root {root};
                }}
            }}
        """))
        self.process = subprocess.Popen([binary, "-c", str(self.conf), "-p", str(prefix)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._wait_ready(prefix)

    def _wait_ready(self, prefix: Path) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"nginx exited: {self.process.stderr.read().decode()}")
            try:
                with socket.create_connection(("127.0.0.1", self.ports["http"]), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise SystemExit(f"nginx did not listen within 10 s (see {prefix / 'logs'})")

    def url(self, scheme: str) -> str:
        return f"{scheme}://127.0.0.1:{self.ports[scheme]}"

    def pids(self) -> list[int]:
        """The master and its workers."""
        pids = [self.process.pid]
        try:
            with open(f"/proc/{self.process.pid}/task/{self.process.pid}/children") as children:
                pids += [int(pid) for pid in children.read().split()]
        except OSError:
            pass
        return pids

    def cpu_seconds(self) -> float:
        total = 0.0
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        return total

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# -- measuring --------------------------------------------------------------------------------

def measure(command: list[str], env: dict, log: Path) -> dict:
    """Runs a child to its end: wall seconds, CPU seconds of it and its waited-for
    descendants (wait4's rusage), peak RSS summed over its tree (polled every 0.1 s), exit
    code. Output goes to ``log`` so that a pipe never slows or stalls the tool."""
    with open(log, "wb") as output:
        started = time.perf_counter()
        child = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL)
        peak = 0.0
        while True:
            waited, status, usage = os.wait4(child.pid, os.WNOHANG)
            if waited:
                break
            peak = max(peak, tree_rss_mb(child.pid))
            time.sleep(0.1)
        wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    return {"seconds": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss_mb": peak,
            "exit": child.returncode}


def stored_files(folder: Path) -> tuple[int, int]:
    """JPEG files under a folder and their total bytes."""
    count = size = 0
    for path in folder.rglob("*.jpg"):
        count += 1
        size += path.stat().st_size
    return count, size


# -- the tools --------------------------------------------------------------------------------

def harvest_command(listing: Path, out: Path, concurrency: int) -> list[str]:
    recipe = out.parent / f"{out.name}.yml"
    recipe.write_text(textwrap.dedent(f"""
        name: real-host
        output: {out}
        run: {{concurrency: {concurrency}, rate_per_host: 1000000, allow_private_addresses: true}}
        sources: [{{use: urls, options: {{path: {listing}}}}}]
        sinks: [jsonl]
    """))
    return [str(Path(sys.executable).with_name("harvest")), "run", str(recipe), "--no-progress"]


def img2dataset_command(binary: Path, listing: Path, out: Path, threads: int) -> list[str]:
    return [str(binary), "--url_list", str(listing), "--input_format", "txt",
            "--output_folder", str(out), "--output_format", "files", "--resize_mode", "no",
            "--disable_all_reencoding", "True", "--processes_count", "2",
            "--thread_count", str(threads)]


def curl_command(urls: list[str], out: Path, cert: Path | None, parallel: int) -> list[str]:
    out.mkdir()
    config = out.parent / f"{out.name}.curl"
    with open(config, "w") as lines:
        for index, url in enumerate(urls):
            lines.write(f'url = "{url}"\noutput = "{out / f"{index}.jpg"}"\n')
    command = ["curl", "-s", "--fail", "--parallel", "--parallel-max", str(parallel),
               "-K", str(config)]
    return command + (["--cacert", str(cert)] if cert else [])


def ensure_img2dataset(venv: Path) -> Path:
    binary = venv / "bin" / "img2dataset"
    if not binary.exists():
        print(f"installing {IMG2DATASET} into {venv}...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", IMG2DATASET], check=True)
    return binary


# -- the run ----------------------------------------------------------------------------------

def span(values: list[float], digits: int = 0) -> str:
    low, high = min(values), max(values)
    text = f"{low:,.{digits}f}"
    return text if f"{high:,.{digits}f}" == text else f"{text}-{high:,.{digits}f}"


def paired_ratios(ours: list[dict], theirs: list[dict]) -> str:
    """Speed and CPU-per-image ratios of runs in the same round, as a range over rounds."""
    pairs = [(mine, next(other for other in theirs if other["round"] == mine["round"]))
             for mine in ours]
    # Beyond start-up, a tiny run's CPU can round to nothing (the smoke test's 50 images):
    # no ratio then, rather than a division by zero.
    speed = [mine["images_per_s"] / other["images_per_s"] for mine, other in pairs
             if other["images_per_s"] > 0]
    cpu = [mine["cpu_ms_per_image"] / other["cpu_ms_per_image"] for mine, other in pairs
           if other["cpu_ms_per_image"] > 0]
    return (f"{span(speed, 2) + 'x' if speed else 'n/a'}, "
            f"{span(cpu, 2) + 'x' if cpu else 'n/a'}")


def without_startup(rows: list[dict], startups: list[dict]) -> list[dict]:
    """Each run's figures per image beyond the start-up run's: (T - T0) / (N - n) for its
    seconds and CPU, T0 and n from the tool's start-up runs on the same scheme (their mean)."""
    derived = []
    for row in rows:
        base = [s for s in startups if s["scheme"] == row["scheme"] and s["tool"] == row["tool"]]
        extra = row["n"] - base[0]["n"]
        seconds = row["seconds"] - sum(s["seconds"] for s in base) / len(base)
        cpu = row["cpu"] - sum(s["cpu"] for s in base) / len(base)
        derived.append(dict(row, images_per_s=extra / max(seconds, 1e-3),
                            cpu_ms_per_image=1000 * max(cpu, 0.0) / extra))
    return derived


def report(rows: list[dict], cases: list[tuple[str, str]], tools: list[str],
           site: dict) -> list[str]:
    lines = []
    header = "| case | " + " | ".join(f"{tool} /s, CPU ms/img" for tool in tools)
    if "harvest" in tools and "img2dataset" in tools:
        header += " | harvest/img2dataset speed, CPU"
    if "harvest" in tools and "curl" in tools:
        header += " | harvest/curl speed, CPU"
    header += " | nginx CPU ms/img |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for scheme, kind in cases:
        case = [r for r in rows if r["scheme"] == scheme and r["kind"] == kind]
        rounds = sorted({r["round"] for r in case})
        info = site[kind]
        cells = [f"{info['count']:,} x {info['bytes'] / info['count'] / 1000:.1f} KB, "
                 f"{scheme.upper()}, {len(rounds)} round{'s' * (len(rounds) > 1)}"]
        by_tool = {tool: [r for r in case if r["tool"] == tool] for tool in tools}
        for tool in tools:
            runs = by_tool[tool]
            cells.append(f"{span([r['images_per_s'] for r in runs])}, "
                         f"{span([r['cpu_ms_per_image'] for r in runs], 2)}")

        if "harvest" in tools and "img2dataset" in tools:
            cells.append(paired_ratios(by_tool["harvest"], by_tool["img2dataset"]))
        if "harvest" in tools and "curl" in tools:
            cells.append(paired_ratios(by_tool["harvest"], by_tool["curl"]))
        cells.append(", ".join(f"{tool} {span([r['nginx_cpu_ms_per_image'] for r in by_tool[tool]], 2)}"
                               for tool in tools))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=10000, help="small JPEGs (about 3 KB)")
    parser.add_argument("--photos", type=int, default=3000, help="photo-like JPEGs (about 55 KB)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each tool per case")
    parser.add_argument("--schemes", default="http,https", help="http, https or both")
    parser.add_argument("--tools", default=",".join(TOOLS),
                        help="any of harvest, img2dataset, curl (comma-separated)")
    parser.add_argument("--concurrency", type=int, default=64,
                        help="harvest's downloads in flight, img2dataset's threads per "
                             "process, curl's --parallel-max")
    parser.add_argument("--startup-n", type=int, default=20,
                        help="images in each tool's start-up run per scheme and round (0: none)")
    parser.add_argument("--nginx-workers", type=int, default=2)
    parser.add_argument("--img2dataset-venv", type=Path,
                        default=Path("~/.cache/harvest-bench/img2dataset-venv").expanduser())
    parser.add_argument("--json", type=Path, help="write every run's figures to this file")
    parser.add_argument("--keep", type=Path, help="work in this (new) folder and keep it")
    args = parser.parse_args(argv)
    schemes = [s for s in args.schemes.split(",") if s]
    tools = [t for t in args.tools.split(",") if t]
    for name, chosen, allowed in (("scheme", schemes, ("http", "https")), ("tool", tools, TOOLS)):
        unknown = [value for value in chosen if value not in allowed]
        if unknown or not chosen:
            parser.error(f"--{name}s: {','.join(unknown) or 'none given'} "
                         f"(choose from {', '.join(allowed)})")
    if shutil.which("curl") is None and "curl" in tools:
        raise SystemExit("curl is not installed")

    nginx_binary = ensure_nginx()
    img2dataset = ensure_img2dataset(args.img2dataset_venv) if "img2dataset" in tools else None
    if args.keep:
        args.keep.mkdir(parents=True)
        work = args.keep.resolve()
    else:
        work = Path(tempfile.mkdtemp(prefix="harvest-real-host-"))
    # nginx's workers run as nobody: every folder on the way to the files must let them in.
    os.chmod(work, 0o755)
    www = work / "www"
    print(f"making {args.small} small and {args.photos} photo JPEGs...", flush=True)
    started = time.perf_counter()
    site = write_site(www, {"small": args.small, "photo": args.photos})
    print(f"  {time.perf_counter() - started:.1f} s", flush=True)
    for folder in [www, *www.iterdir()]:
        os.chmod(folder, 0o755)
    cert, key = make_certificate(work)
    server = Nginx(nginx_binary, work, www, (cert, key), args.nginx_workers)
    rows: list[dict] = []
    startups: list[dict] = []
    failures: list[str] = []
    try:
        probe = f"{server.url('http')}/{next(iter(site))}/0.jpg"
        with urllib.request.urlopen(probe, timeout=5) as answer:
            if answer.status != 200:
                raise SystemExit(f"nginx answered {answer.status} for {probe}")
        env = dict(os.environ, SSL_CERT_FILE=str(cert), NO_PROXY="127.0.0.1",
                   no_proxy="127.0.0.1", NO_ALBUMENTATIONS_UPDATE="1", HOME=str(work / "home"))
        (work / "home").mkdir()
        cases = [(scheme, kind) for scheme in schemes for kind in KINDS if kind in site]

        def run(tool: str, scheme: str, kind: str, label: str, round_number: int,
                count: int) -> dict:
            urls = [f"{server.url(scheme)}/{kind}/{index}.jpg" for index in range(count)]
            name = f"{scheme}-{label}-{tool}-{round_number}"
            listing, out = work / f"{name}.txt", work / name
            listing.write_text("".join(url + "\n" for url in urls))
            if tool == "harvest":
                command = harvest_command(listing, out, args.concurrency)
            elif tool == "img2dataset":
                command = img2dataset_command(img2dataset, listing, out, args.concurrency)
            else:
                command = curl_command(urls, out, cert if scheme == "https" else None,
                                       args.concurrency)
            print(f"{scheme} {label} round {round_number}: {tool}...", end=" ", flush=True)
            nginx_before = server.cpu_seconds()
            figures = measure(command, env, work / f"{name}.log")
            nginx_cpu = server.cpu_seconds() - nginx_before
            files, size = stored_files(out / "images" if tool == "harvest" else out)
            row = {"scheme": scheme, "kind": label, "tool": tool, "round": round_number,
                   "n": count, **figures, "stored": files, "stored_bytes": size,
                   "images_per_s": count / figures["seconds"],
                   "cpu_ms_per_image": 1000 * figures["cpu"] / count,
                   "nginx_cpu_ms_per_image": 1000 * nginx_cpu / count}
            print(f"{row['images_per_s']:,.0f}/s, {row['cpu_ms_per_image']:.2f} CPU ms/img, "
                  f"stored {files}/{count}", flush=True)
            expected_bytes = sum((www / kind / f"{index}.jpg").stat().st_size
                                 for index in range(count))
            if figures["exit"] != 0 or files != count or size != expected_bytes:
                failures.append(f"{tool} on {scheme} {label} round {round_number}: exit "
                                f"{figures['exit']}, stored {files} of {count} files, "
                                f"{size} of {expected_bytes} bytes (log: {work / name}.log)")
            return row

        for scheme in schemes:
            # Start-up (imports, worker processes, the first connections) on a few images,
            # so that the per-image cost of the long runs can be told apart from it.
            first_kind = next(iter(site))
            startup_n = min(args.startup_n, site[first_kind]["count"])
            for round_number in range(1, args.rounds + 1 if startup_n else 1):
                for tool in tools:
                    startups.append(run(tool, scheme, first_kind, "start-up", round_number,
                                        startup_n))
            for kind in (kind for case_scheme, kind in cases if case_scheme == scheme):
                for round_number in range(1, args.rounds + 1):
                    shift = (round_number - 1) % len(tools)
                    for tool in tools[shift:] + tools[:shift]:
                        rows.append(run(tool, scheme, kind, kind, round_number,
                                        site[kind]["count"]))
    finally:
        server.stop()

    command = shlex.join(["python", "bench/real_host.py", *(argv if argv is not None else sys.argv[1:])])
    print()
    print(f"nginx {args.nginx_workers} workers on 127.0.0.1; {os.cpu_count()} CPUs shared by "
          f"the tool and nginx; concurrency {args.concurrency} (harvest downloads, img2dataset "
          f"threads per process x 2 processes, curl --parallel-max); CPU is the tool's whole "
          f"process tree")
    print(f"command: {command}\n\nWhole runs, start-up included:\n")
    for line in report(rows, cases, tools, site):
        print(line)
    if startups and all(row["n"] > startups[0]["n"] for row in rows):
        spans = []
        for scheme in schemes:
            for tool in tools:
                runs = [s for s in startups if s["scheme"] == scheme and s["tool"] == tool]
                spans.append(f"{scheme} {tool} {span([s['seconds'] for s in runs], 2)} s, "
                             f"{span([s['cpu'] for s in runs], 2)} s CPU")
        print(f"\nStart-up runs on {startups[0]['n']} images: {'; '.join(spans)}")
        print("\nPer image beyond start-up ((T - T0) / (N - n), T0 of the start-up runs):\n")
        for line in report(without_startup(rows, startups), cases, tools, site):
            print(line)
    if "curl" in tools:
        for scheme, kind in cases:
            case = [r for r in rows if r["scheme"] == scheme and r["kind"] == kind]
            floor = min(r["images_per_s"] for r in case if r["tool"] == "curl")
            others = [r["images_per_s"] for r in case if r["tool"] != "curl"]
            if others:
                margin = floor / max(others)
                verdict = ("the server is not the bound" if margin >= 1.5
                           else "WARNING: curl is not far ahead, the server may be the bound")
                print(f"  {scheme} {kind}: slowest curl run {margin:.1f}x the fastest other "
                      f"tool's: {verdict}")
    if args.json:
        args.json.write_text(json.dumps({"command": command, "site": site, "runs": rows,
                                         "startups": startups, "failures": failures}, indent=2))
    if not args.keep and not failures:
        shutil.rmtree(work, ignore_errors=True)
    if failures:
        print("\nNOT ALL FILES STORED; these figures measure failures:", file=sys.stderr)
        for failure in failures:
            print(f"  {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
