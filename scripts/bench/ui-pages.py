#!/usr/bin/env python3
"""What open web pages (/ui) cost the API: P1's numerator (authenticated GET /jobs, wrk, 32
connections, 2 threads, 10 s a run) without and with N pages (default 50) open on it, side by
side in one run, written as the section "Web page: 50 open pages" of BENCHMARKS.md.

    scripts/bench/ui-pages.py [--bin PATH] [--pages 50] [--reps 3] [--duration 10]
                              [--out BENCHMARKS.md] [--no-write]

The pages are real: one headless Chromium (Debian's chromium, chromium-driver) with N windows,
each signed in with its own token by /ui#token=..., all on the machine that runs the server
and wrk, so the figure includes what the pages' browser costs the machine, not only the
requests. "Without" points every window at about:blank (the browser stays up); "with" loads
the page in every window; runs alternate (off-on, on-off, ...: ABBA) so a drift of the
machine cancels. The tenant's list is P1's 10 jobs (scripts/bench/helper.py jobs --seed 1),
two of them set to replicating so that every page's round also asks for their detail (a
heavier load than P1's terminal jobs alone). The jobs do not move, so after its first rounds a page
only asks GET /changes, every 5 s once its wait has grown. The pages' own request rate comes from
the server's /metrics (all requests minus wrk's), the browser's CPU from /proc.

Every process it starts (server, chromedriver and its browser, wrk) is stopped, and its
temporary directory removed, when it exits. Standard library only.
"""

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import http.client as httpclient
import time
import urllib.error
import urllib.request

sys.dont_write_bytecode = True  # no __pycache__ in scripts/bench
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import helper  # noqa: E402  (the bench's own helpers: the sections of BENCHMARKS.md)

MARK_START = "<!-- scripts/bench/ui-pages.py: start -->"
MARK_END = "<!-- scripts/bench/ui-pages.py: end -->"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HELPER = os.path.join(ROOT, "scripts", "bench", "helper.py")
REPORT_LUA = os.path.join(ROOT, "scripts", "bench", "report.lua")
JOBS = "/v2/extension/image_replicator/jobs"
CHANGES = "/v2/extension/image_replicator/changes"
T1 = "1b0e5c9a2f3d4e6b8a7c0d1e2f3a4b5c"
T2 = "2c1f6d0b3a4e5f7c9b8d1e2f3a4b5c6d"
TOK1 = "b1e2c3d4e5f60718293a4b5c6d7e8f90"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1280,900",
]
SECTION = "## Web page: 50 open pages"
TICK = os.sysconf("SC_CLK_TCK")

started = []  # Popen objects, each the leader of its own process group


def log(text):
    print(f"[ui-pages {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def kill_marked(marker):
    """SIGKILLs every process whose command line holds `marker` (our own temporary path)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    os.kill(int(pid), signal.SIGKILL)
        except OSError:
            continue


def cleanup(marker=None):
    for proc in reversed(started):
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.time() + 10
    for proc in reversed(started):
        try:
            proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if marker:
        kill_marked(marker)


def spawn(args, **kw):
    proc = subprocess.Popen(args, start_new_session=True, **kw)
    started.append(proc)
    return proc


def port_from(proc, pattern, what):
    """The port a process prints on its stdout (a line matching `pattern`)."""
    for line in proc.stdout:
        m = re.search(pattern, line)
        if m:
            return int(m.group(1))
    sys.exit(f"ui-pages: {what} did not say its port")


def http(method, url, body=None, token=None, timeout=60):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if body is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("X-Auth-Token", token)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def ir(binary, data, *args):
    out = subprocess.run([binary, "--data-dir", data, *args], check=True,
                         capture_output=True, text=True)
    return out.stdout.strip()


def request_count(port):
    """Every request the server counted so far (all routes)."""
    status, body = http("GET", f"http://127.0.0.1:{port}/metrics")
    if status != 200:
        sys.exit(f"ui-pages: /metrics answered {status}")
    total = 0
    for line in body.decode().splitlines():
        if line.startswith("image_replicator_http_requests_total{"):
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def cpu_ticks(marker):
    """utime+stime of every process whose command line holds `marker`, and of every process
    below one (Chromium's zygotes, renderers and utility processes need not carry it)."""
    ticks, parent, marked = {}, {}, set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, IndexError):
            continue
        pid = int(entry)
        parent[pid] = int(fields[1])
        ticks[pid] = int(fields[11]) + int(fields[12])
        if marker.encode() in cmdline:
            marked.add(pid)
    total = 0
    for pid, spent in ticks.items():
        up = pid
        while up > 1 and up not in marked:
            up = parent.get(up, 0)
        if up in marked:
            total += spent
    return total


def proc_ticks(pid):
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


class Driver:
    """chromedriver's W3C WebDriver API, for one session."""

    def __init__(self, profile):
        self.proc = spawn(["chromedriver", "--port=0"], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
        port = port_from(self.proc, r"started successfully on port (\d+)", "chromedriver")
        self.base = f"http://127.0.0.1:{port}"
        binary = "/usr/lib/chromium/chromium"
        if not os.path.exists(binary):
            binary = "chromium"
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": binary, "args": CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]}}}}
        self.session = self.call("POST", "/session", caps)["sessionId"]

    def call(self, method, path, body=None):
        if method == "POST" and body is None:
            body = {}
        status, reply = http(method, self.base + path, body)
        value = json.loads(reply).get("value")
        if status != 200:
            sys.exit(f"ui-pages: WebDriver {method} {path}: {value}")
        return value

    def s(self, rest):
        return f"/session/{self.session}{rest}"

    def quit(self):
        self.call("DELETE", self.s(""))

    def windows(self, count):
        handles = [self.call("GET", self.s("/window"))]
        while len(handles) < count:
            handles.append(self.call("POST", self.s("/window/new"), {"type": "window"})["handle"])
        return handles

    def show(self, handle, url):
        self.call("POST", self.s("/window"), {"handle": handle})
        self.call("POST", self.s("/url"), {"url": url})

    def script(self, handle, js):
        self.call("POST", self.s("/window"), {"handle": handle})
        return self.call("POST", self.s("/execute/sync"), {"script": js, "args": []})


def wrk(port, seconds):
    out = subprocess.run(
        ["wrk", "-t2", "-c32", f"-d{seconds}s", "--timeout", "10s", "-H", f"X-Auth-Token: {TOK1}",
         "-s", REPORT_LUA, f"http://127.0.0.1:{port}{JOBS}"],
        check=True, capture_output=True, text=True)
    line = next(l for l in out.stdout.splitlines() if l.startswith("BENCHJSON "))
    return json.loads(line[len("BENCHJSON "):])


def route_counts(port):
    """The server's request counters by route template (all methods and statuses)."""
    status, body = http("GET", f"http://127.0.0.1:{port}/metrics")
    out = {}
    for line in body.decode().splitlines():
        m = re.match(r'image_replicator_http_requests_total\{route="([^"]*)".*\} (\S+)', line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0) + int(float(m.group(2)))
    return out


class Replay:
    """The requests of N pages without a browser: per page one keep-alive connection and the
    page's schedule (a round of the list, each running job's detail when 5 s have passed, the
    images when 30 s have; then GET /changes?timeout=0 at once, and 1 s, 2 s … up to 5 s after
    each unchanged answer, until the list's tag changes), so that the server's share of the pages' cost can be told from the browser's."""

    def __init__(self, port, tokens, running_jobs):
        self.port, self.tokens, self.running_jobs = port, tokens, running_jobs
        self.stop = threading.Event()
        self.threads = []
        self.conns = []
        self.sent = 0
        self.lock = threading.Lock()

    def page(self, index, token):
        conn = httpclient.HTTPConnection("127.0.0.1", self.port, timeout=60)
        with self.lock:
            self.conns.append(conn)
        headers = {"X-Auth-Token": token}
        # Pages opened at different moments: spread their first rounds over the second.
        if self.stop.wait(index / len(self.tokens)):
            return
        tag, detail_at, images_at = None, -1e9, -1e9
        changed, unchanged = True, 0
        try:
            while not self.stop.is_set():
                if not changed:
                    if unchanged and self.stop.wait(unchanged):
                        break
                    conn.request("GET", f"{CHANGES}?after={tag}&timeout=0", headers=headers)
                    new = json.loads(conn.getresponse().read())["tag"]
                    changed, tag = new != tag, new
                    unchanged = 0 if changed else min(unchanged + 1, 5)
                    with self.lock:
                        self.sent += 1
                    continue
                now = time.monotonic()
                paths = [JOBS]
                if now - detail_at >= 5:
                    paths += [f"{JOBS}/{job}/detail" for job in self.running_jobs]
                    detail_at = now
                if now - images_at >= 30:
                    paths.append("/v2/images")
                    images_at = now
                for path in paths:
                    conn.request("GET", path, headers=headers)
                    conn.getresponse().read()
                if tag is None:
                    # The first tag, taken after the first round: one more round follows.
                    conn.request("GET", CHANGES, headers=headers)
                    tag = json.loads(conn.getresponse().read())["tag"]
                    paths.append(CHANGES)
                else:
                    changed, unchanged = False, 0
                with self.lock:
                    self.sent += len(paths)
        except (OSError, httpclient.HTTPException, ValueError, KeyError):
            if not self.stop.is_set():
                raise
        finally:
            conn.close()

    def __enter__(self):
        for i, token in enumerate(self.tokens):
            t = threading.Thread(target=self.page, args=(i, token), daemon=True)
            t.start()
            self.threads.append(t)
        time.sleep(2)
        return self

    def __exit__(self, *exc):
        self.stop.set()
        # A page waiting in GET /changes is woken by closing its connection.
        with self.lock:
            for conn in self.conns:
                if conn.sock is not None:
                    try:
                        conn.sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
        for t in self.threads:
            t.join(timeout=30)


def run_pair(label, runs, rep, port, server, profile, duration, state):
    """One rep: wrk without and with the pages (`state(on)` switches them), ABBA."""
    order = [False, True] if rep % 2 else [True, False]
    pair = {}
    for on in order:
        with state(on):
            r0, c0, s0 = request_count(port), cpu_ticks(profile), proc_ticks(server.pid)
            t0 = time.time()
            result = wrk(port, duration)
            elapsed = time.time() - t0
            r1, c1, s1 = request_count(port), cpu_ticks(profile), proc_ticks(server.pid)
        rps = result["requests"] / (result["duration_us"] / 1e6)
        others = (r1 - r0) - result["requests"]
        pair[on] = {
            "rps": rps,
            "non2xx": result["non2xx"],
            "page_rps": others / elapsed,
            "browser_cpu": (c1 - c0) / TICK / elapsed,
            "server_cpu": (s1 - s0) / TICK / elapsed,
        }
        log(f"{label} rep {rep} pages {'on ' if on else 'off'}: {rps:,.0f} req/s, "
            f"other requests {others / elapsed:.1f}/s, "
            f"browser CPU {pair[on]['browser_cpu']:.2f} cores, "
            f"server CPU {pair[on]['server_cpu']:.2f} cores")
    pair["ratio"] = pair[True]["rps"] / pair[False]["rps"]
    # The requests the server counted beyond wrk's, less those of the run without pages
    # (wrk's requests still in flight when it stops): the pages' own.
    pair["page_rps"] = pair[True]["page_rps"] - pair[False]["page_rps"]
    runs.append(pair)


def table(runs):
    lines = [
        "| rep | without pages (req/s) | with pages (req/s) | with / without | pages' requests/s | browser CPU (cores) | server CPU without / with (cores) |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(runs, 1):
        lines.append(
            f"| {i} | {r[False]['rps']:,.0f} | {r[True]['rps']:,.0f} | {r['ratio']:.3f} | "
            f"{r['page_rps']:.1f} | {r[True]['browser_cpu']:.2f} | "
            f"{r[False]['server_cpu']:.2f} / {r[True]['server_cpu']:.2f} |")
    return lines


def summary(runs):
    return {
        "ratio": statistics.median(r["ratio"] for r in runs),
        "off": statistics.median(r[False]["rps"] for r in runs),
        "on": statistics.median(r[True]["rps"] for r in runs),
        "page_rps": statistics.median(r["page_rps"] for r in runs),
        "non2xx": sum(r[True]["non2xx"] + r[False]["non2xx"] for r in runs),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "image-replicator"))
    ap.add_argument("--pages", type=int, default=50)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"))
    ap.add_argument("--no-write", action="store_true", help="print the section only")
    args = ap.parse_args()
    for tool in ("wrk", "chromedriver"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode:
            sys.exit(f"ui-pages: {tool} is missing (Debian's wrk, chromium and chromium-driver).")
    binary = os.path.abspath(args.bin)
    if not os.path.exists(binary):
        sys.exit(f"ui-pages: no binary at {binary}: cargo build --release, or pass --bin.")

    tmp = tempfile.TemporaryDirectory(prefix="ui-pages-")
    data = os.path.join(tmp.name, "data")
    profile = os.path.join(tmp.name, "chromium")
    real_runs, replay_runs = [], []
    started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    load_start = open("/proc/loadavg").read().split()[:3]
    try:
        log("preparing the store (P1's 10 jobs, two of them replicating)")
        ir(binary, data, "region", "add", "ot1")
        ir(binary, data, "region", "add", "ot2")
        ir(binary, data, "tenant", "add", T1, "--region", "ot1")
        ir(binary, data, "tenant", "add", T2, "--region", "ot2")
        ir(binary, data, "user", "add", "bench", "--tenant", T1, "--tenant", T2)
        ir(binary, data, "token", "issue", "--user", "bench", "--tenant", T1, "--token", TOK1)
        jobs_file = os.path.join(tmp.name, "jobs.json")
        subprocess.run([sys.executable, HELPER, "jobs", jobs_file, "--tenant", T1, "--region",
                        "ot1", "--count", "10", "--seed", "1"], check=True)
        with open(jobs_file, encoding="utf-8") as f:
            jobs = json.load(f)
        for job in jobs[:2]:
            job.update(status="replicating", copy_progress=37, destination_image_id=None)
        with open(jobs_file, "w", encoding="utf-8") as f:
            json.dump(jobs, f)
        ir(binary, data, "job", "seed", jobs_file)
        log(f"issuing {args.pages} page tokens")
        page_tokens = [ir(binary, data, "token", "issue", "--user", "bench", "--tenant", T1)
                       for _ in range(args.pages)]

        server = spawn([binary, "serve", "--no-worker", "--listen", "127.0.0.1:0",
                        "--data-dir", data], stdout=subprocess.PIPE,
                       stderr=open(os.path.join(tmp.name, "server.log"), "w"), text=True)
        port = port_from(server, r"image-replicator listening on http://127\.0\.0\.1:(\d+)",
                         "the server")
        status, body = http("GET", f"http://127.0.0.1:{port}{JOBS}", token=TOK1)
        if status != 200 or len(json.loads(body)) != 10:
            sys.exit(f"ui-pages: the list answered {status}: {body[:200]!r}")

        log(f"starting Chromium with {args.pages} windows")
        driver = Driver(profile)
        handles = driver.windows(args.pages)

        def pages(on):
            for handle, token in zip(handles, page_tokens):
                driver.show(handle, f"http://127.0.0.1:{port}/ui#token={token}" if on
                            else "about:blank")
            if on:
                # Every page signed in and showing the ten jobs.
                deadline = time.time() + 60
                for handle in handles:
                    while True:
                        shown = driver.script(
                            handle, "return document.querySelectorAll('#job-rows tr').length;")
                        if shown == 10:
                            break
                        if time.time() > deadline:
                            sys.exit("ui-pages: a page did not show the ten jobs")
                        time.sleep(0.2)
                hidden = sum(bool(driver.script(h, "return document.hidden;")) for h in handles)
                if hidden:
                    log(f"note: {hidden} of {len(handles)} pages report document.hidden")
            # Loading (or leaving) 50 pages keeps the browser busy for a while after the last
            # one shows its jobs: the runs measure open pages, not their loading.
            time.sleep(10)

        def per_page(seconds):
            """Requests a page and second by route, over `seconds` without wrk."""
            c0, t0 = route_counts(port), time.time()
            time.sleep(seconds)
            c1, elapsed = route_counts(port), time.time() - t0
            rates = {route: (c1.get(route, 0) - c0.get(route, 0)) / elapsed / args.pages
                     for route in c1 if c1.get(route, 0) != c0.get(route, 0)}
            rates.pop("/metrics", None)
            return rates

        # What the real pages ask for, without wrk.
        pages(True)
        calibration = per_page(max(10, 6 * args.duration))
        log(f"real pages, per page and second: {calibration}")

        class Browser:
            def __init__(self, on):
                self.on = on

            def __enter__(self):
                pages(self.on)

            def __exit__(self, *exc):
                pass

        log("warming up")
        wrk(port, 2)
        for rep in range(1, args.reps + 1):
            run_pair("browser", real_runs, rep, port, server, profile, args.duration, Browser)
        pages(False)
        driver.quit()

        running = [job["job_id"] for job in jobs[:2]]

        class Replayed:
            def __init__(self, on):
                self.replay = Replay(port, page_tokens, running) if on else None

            def __enter__(self):
                if self.replay:
                    self.replay.__enter__()
                else:
                    time.sleep(2)

            def __exit__(self, *exc):
                if self.replay:
                    self.replay.__exit__(*exc)

        with Replay(port, page_tokens, running):
            replayed = per_page(max(10, 6 * args.duration))
        log(f"replayed pages, per page and second: {replayed}")
        for rep in range(1, args.reps + 1):
            run_pair("replay", replay_runs, rep, port, server, profile, args.duration, Replayed)
    finally:
        cleanup(tmp.name)
        load_end = open("/proc/loadavg").read().split()[:3]
        tmp.cleanup()

    real, rep = summary(real_runs), summary(replay_runs)

    def rates(per_route):
        return ", ".join(f"`{route}` {value:.2f}" for route, value in sorted(per_route.items()))

    def verdict(cost):
        return "met" if cost < 0.10 else "not met"

    lines = [
        SECTION,
        "",
        f"Measured {started_at} with `scripts/bench/ui-pages.py --pages {args.pages} --reps "
        f"{args.reps} --duration {args.duration}` (binary `{os.path.relpath(binary, ROOT)}`; load "
        f"average at start / end {' '.join(load_start)} / {' '.join(load_end)}). P1's numerator, "
        f"`GET /jobs` with a token (10 jobs, wrk 2 threads, 32 connections, {args.duration} s a "
        f"run), without and with {args.pages} open pages, each rep's two runs back to back, the "
        "order alternating (ABBA). Two of the tenant's ten jobs are `replicating` (seeded, not "
        "moving), so each page's round also asks for those two jobs' detail; between rounds a "
        "page asks `GET /changes` whether its list changed (here never): at once, then 1 s, "
        "2 s … up to 5 s after each unchanged answer. The rates per page are counted over "
        f"{max(10, 6 * args.duration)} s without wrk.",
        "",
        f"**Pages in a browser on the server's own 2 CPUs.** One headless Chromium with "
        f"{args.pages} windows, each signed in to `/ui` with its own token; without: every "
        "window at `about:blank` (the browser stays up). Without wrk, the real pages asked, per "
        f"page and second: {rates(calibration)}.",
        "",
        *table(real_runs),
        "",
        f"Median: {real['off']:,.0f} req/s without, {real['on']:,.0f} with, ratio "
        f"**{real['ratio']:.3f}** ({(1 - real['ratio']) * 100:.1f} % less; goal: less than 10 %, "
        f"**{verdict(1 - real['ratio'])}**). Here the browser's own CPU competes with the server "
        "and wrk for the 2 CPUs.",
        "",
        f"**The pages' requests from elsewhere.** The same {args.pages} tokens, one keep-alive "
        "connection each, on the pages' schedule (a round of the list, the two details when 5 s "
        "have passed and the images when 30 s have, then `GET /changes` as the page asks it "
        "until the list changes; the pages spread over a second), from a thread "
        f"each of this script; no browser. They asked, per page and second: {rates(replayed)}.",
        "",
        *table(replay_runs),
        "",
        f"Median: {rep['off']:,.0f} req/s without, {rep['on']:,.0f} with, ratio "
        f"**{rep['ratio']:.3f}** ({(1 - rep['ratio']) * 100:.1f} % less; goal: less than 10 %, "
        f"**{verdict(1 - rep['ratio'])}**): what {args.pages} pages cost the API when their "
        "browsers run on the operators' machines, as they do. Non-2xx answers in all runs: "
        f"{real['non2xx'] + rep['non2xx']}.",
        "",
    ]
    section = "\n".join(lines)
    print(section)
    if args.no_write:
        return
    helper.put_section(args.out, MARK_START, MARK_END, f"{MARK_START}\n{section}\n{MARK_END}\n")
    log(f"wrote the section into {args.out}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
