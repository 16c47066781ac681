#!/usr/bin/env python3
"""Costs as the store grows (issue 18), `scripts/bench.sh --only G`: idle memory, start-up,
`/metrics`, bytes per job, seeding and `GET /jobs` at 10k, 100k, 300k and 1M jobs, and durable
creates (POST /jobs) beside a plain write+fdatasync loop. Standard library only
(python3 >= 3.9), plus wrk, the binary under test, and perf or strace for the sync-call count.

    growth.py --bin BIN [--quick] [--tmpdir DIR] [--keep] [--out FILE] [--reps N]
              [--duration S] [--seed-batch N] [--sizes 10000,100000,...]

One data directory grows step by step (seeded through the running server with
`job seed FILE`, in files of at most --seed-batch jobs): at each size the server is stopped
and the store measured on disk, started three times (start-up), a fourth time and left alone
(idle memory), a job is cancelled and `/metrics` scraped twice, and `GET /jobs` timed with wrk.
The POST figures come from a fresh store (comparable with bench.sh's P4) at 1, 8, 32 and 128
connections, each beside a write+fdatasync loop with as many threads on the same file system,
plus one run at 32 connections on the biggest store. Everything lives in a temporary directory
under --tmpdir, removed at the end (--keep keeps it); every process started is stopped, also
on Ctrl-C or an error. The section "Costs as the store grows (issue 18)" of BENCHMARKS.md is
replaced between its markers (--quick: a temp file, printed).
"""

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

sys.dont_write_bytecode = True  # no __pycache__ in scripts/bench
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import helper  # noqa: E402  (put_section)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
START = "<!-- scripts/bench.sh --only G: start -->"
END = "<!-- scripts/bench.sh --only G: end -->"
JOBS = "/v2/extension/image_replicator/jobs"
TICK = os.sysconf("SC_CLK_TCK")
MIB = 1024 * 1024
REGIONS = ["RegionOne", "RegionTwo", "RegionThree", "RegionFour"]
TENANTS = [hashlib.md5(f"growth-tenant-{i}".encode()).hexdigest() for i in range(100)]
PROBE = hashlib.md5(b"growth-probe-tenant").hexdigest()  # 100 jobs at every size
PROBE_JOBS = 100
TOKEN_PROBE = "growth" + "p" * 26
TOKEN_BIG = "growth" + "b" * 26  # TENANTS[0]: 1 % of the store
IMAGE = "5f4c9a3e-6d7b-4c8f-a2e1-4b5c6d7e8f90"  # 4 KiB, the probe tenant's: POST /jobs
NAMES = ["cirros-0.6.2", "ubuntu-24.04-server-cloudimg-amd64", "debian-12-genericcloud-amd64",
         "fedora-coreos-40.20240616", "rocky-9-GenericCloud-Base", "centos-stream-9",
         "windows-server-2022-eval", "alpine-virt-3.20.1"]
# Mostly terminal, a few waiting (seeded without --enqueue: the worker leaves them alone).
STATUSES = [("replicated", 80), ("error", 10), ("canceled", 8), ("replicate_requested", 2)]
PROCS = []  # every process started, stopped at exit


def log(msg):
    print(f"[growth {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def die(msg):
    raise SystemExit(f"growth.py: {msg}")


def call(method, url, token=None, body=None, timeout=60):
    return helper.http(method, url, token, body, timeout, unreachable=(None, b""))


def spawn(cmd, **kw):
    proc = subprocess.Popen(cmd, **kw)
    PROCS.append(proc)
    return proc


def stop_all():
    for proc in PROCS:
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGINT if proc.args[0] == "perf" else signal.SIGTERM)
            except OSError:
                pass
    for proc in PROCS:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_kib(pid, key):
    with open(f"/proc/{pid}/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def cpu_s(pid):
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def du_bytes(path):
    apparent = int(subprocess.run(["du", "-s", "-B1", "--apparent-size", path], check=True,
                                  capture_output=True, text=True).stdout.split()[0])
    allocated = int(subprocess.run(["du", "-s", "-B1", path], check=True,
                                   capture_output=True, text=True).stdout.split()[0])
    return apparent, allocated


class Server:
    """`image-replicator serve` on a free port of 127.0.0.1."""

    def __init__(self, args, data, log_path, extra=()):
        self.args, self.data, self.log_path, self.extra = args, data, log_path, list(extra)
        self.proc = None

    def start(self, probe=True):
        """Starts the server; returns (seconds until the socket accepts, until the
        "listening on" line, until /healthz answers 200), the last None without probe."""
        self.port = free_port()
        cmd = [self.args.bin, "--data-dir", self.data, "serve", "--listen",
               f"127.0.0.1:{self.port}"] + self.extra
        t0 = time.monotonic()
        self.proc = spawn(cmd, stdout=subprocess.PIPE, stderr=open(self.log_path, "a"),
                          stdin=subprocess.DEVNULL, text=True)
        self.t0 = t0
        line_at = []

        def read_stdout():
            for line in self.proc.stdout:
                if line.startswith("image-replicator listening on ") and not line_at:
                    line_at.append(time.monotonic() - t0)

        threading.Thread(target=read_stdout, daemon=True).start()
        accept = healthz = None
        deadline = t0 + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                die(f"the server exited at start: {open(self.log_path).read()[-2000:]}")
            if probe and accept is None:
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                        accept = time.monotonic() - t0
                except OSError:
                    time.sleep(0.001)
                    continue
            if probe:
                if call("GET", f"http://127.0.0.1:{self.port}/healthz", timeout=10)[0] == 200:
                    healthz = time.monotonic() - t0
                    break
                time.sleep(0.001)
            elif line_at:
                break
            else:
                time.sleep(0.001)
        else:
            die("the server did not start within 300 s")
        while not line_at and time.monotonic() < deadline:
            time.sleep(0.001)
        return accept, line_at[0] if line_at else None, healthz

    @property
    def pid(self):
        return self.proc.pid

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self):
        t0 = time.monotonic()
        self.proc.terminate()
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            die("the server did not stop within 120 s of SIGTERM")
        return time.monotonic() - t0


def ir(args, data, *argv, stdin=None):
    out = subprocess.run([args.bin, "--data-dir", data] + list(argv), capture_output=True,
                         text=True, input=stdin)
    if out.returncode != 0:
        die(f"image-replicator {' '.join(argv)} failed: {out.stderr.strip()}")
    return out.stdout


# ----- the jobs --------------------------------------------------------------------------


def job_at(n, rng):
    """Job number n of the store, in the list-response format (`job seed`)."""
    if n < PROBE_JOBS:
        src = PROBE
        region = REGIONS[0]
    else:
        src = TENANTS[n % len(TENANTS)]
        region = REGIONS[(n % len(TENANTS)) % len(REGIONS)]
    dst_i = rng.randrange(len(TENANTS))
    pick = rng.randrange(100)
    for status, weight in STATUSES:
        if pick < weight:
            break
        pick -= weight
    image_k = rng.randrange(20)
    return {
        "copy_progress": {"replicated": 100, "replicate_requested": 0}.get(status,
                                                                           rng.randrange(100)),
        "destination_image_id": (str(uuid.UUID(int=rng.getrandbits(128), version=4))
                                 if status == "replicated" else None),
        "destination_region_id": REGIONS[dst_i % len(REGIONS)],
        "destination_tenant_id": TENANTS[dst_i],
        "job_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "source_image_id": str(uuid.uuid5(uuid.NAMESPACE_OID, f"{src}/{image_k}")),
        "source_image_name": NAMES[image_k % len(NAMES)],
        "source_region_id": region,
        "source_tenant_id": src,
        "status": status,
    }


def write_seed(path, first, count):
    """Jobs first..first+count-1 into a seed file."""
    rng = random.Random(first)
    with open(path, "w", encoding="utf-8") as f:
        f.write("[")
        for n in range(first, first + count):
            job = job_at(n, rng)
            f.write(("," if n > first else "") + json.dumps(job, separators=(",", ":")))
        f.write("]")


def seed_through(args, data, path):
    """`job seed FILE` (the server runs: through its admin socket); returns (seconds, the
    CLI's peak RSS in KiB)."""
    cmd = [args.bin, "--data-dir", data, "job", "seed", path]
    timer = shutil.which("time") or ("/usr/bin/time" if os.path.exists("/usr/bin/time") else None)
    if timer:
        mem = path + ".time"
        t0 = time.monotonic()
        out = subprocess.run([timer, "-f", "%M", "-o", mem] + cmd, capture_output=True, text=True)
        took = time.monotonic() - t0
        kib = int(open(mem).read().split()[-1]) if out.returncode == 0 else None
    else:
        probe = ("import resource, subprocess, sys, time; t = time.monotonic(); "
                 "r = subprocess.run(sys.argv[1:], capture_output=True); "
                 "print(time.monotonic() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
                 "sys.exit(r.returncode)")
        out = subprocess.run([sys.executable, "-c", probe] + cmd, capture_output=True, text=True)
        took, kib = (float(x) for x in out.stdout.split()[:2]) if out.returncode == 0 else (0, 0)
        kib = int(kib)
    if out.returncode != 0:
        die(f"job seed {path} failed: {out.stderr.strip()}")
    return took, kib


# ----- wrk, perf, the fsync loop ---------------------------------------------------------


def wrk(server, path, conns, secs, token, post=False, threads=None):
    threads = threads or (1 if conns == 1 else 2)
    script = os.path.join(ROOT, "scripts/bench", "post-job.lua" if post else "report.lua")
    cmd = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{secs}s", "--timeout", "10s",
           "-H", f"X-Auth-Token: {token}", "-s", script, server.url(path)]
    env = dict(os.environ, BENCH_POST_BODY=json.dumps({"image_id": IMAGE,
                                                       "tenant_id_dst": PROBE}))
    proc = spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    out, _ = proc.communicate()
    for line in out.splitlines():
        if line.startswith("BENCHJSON "):
            r = json.loads(line[len("BENCHJSON "):])
            r["ok"] = r["requests"] - r["non2xx"] - r["timeouts"]
            r["rate"] = r["ok"] / (r["duration_us"] / 1e6)
            return r
    die("wrk printed no summary: " + out[-2000:])


SYNC_CALLS = ("fdatasync", "fsync", "sync_file_range")


class SyncCounter:
    """Counts the server's sync system calls: perf stat on the syscall tracepoints if it can
    attach (cheap), else strace -c (which slows the server: its ratio counts, not its rate)."""

    def __init__(self, work):
        self.work = work
        self.tool = None
        for tool in ("perf", "strace"):
            if shutil.which(tool) and self._works(tool):
                self.tool = tool
                break

    def _cmd(self, tool, pid, out):
        if tool == "perf":
            events = ",".join(f"syscalls:sys_enter_{c}" for c in SYNC_CALLS)
            return ["perf", "stat", "-x", ",", "-e", events, "-p", str(pid), "-o", out]
        return ["strace", "-f", "-qq", "-c", "-e", "trace=" + ",".join(SYNC_CALLS), "-p",
                str(pid), "-o", out]

    def _works(self, tool):
        victim = spawn([sys.executable, "-c", "import os, sys, time; time.sleep(0.7); "
                        "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT); os.fsync(fd); "
                        "os.remove(sys.argv[1]); time.sleep(0.5)",
                        os.path.join(self.work, f"try-{tool}.bin")])
        out = os.path.join(self.work, f"try-{tool}.txt")
        counter = spawn(self._cmd(tool, victim.pid, out), stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
        victim.wait()
        try:
            counter.wait(5)
        except subprocess.TimeoutExpired:
            counter.send_signal(signal.SIGINT)
            counter.wait()
        return os.path.exists(out) and self._parse(tool, out).get("fsync", 0) >= 1

    def _parse(self, tool, out):
        calls = {}
        for line in open(out, encoding="utf-8", errors="replace"):
            if tool == "perf":
                parts = line.strip().split(",")
                if len(parts) > 2 and parts[2].startswith("syscalls:sys_enter_"):
                    name = parts[2][len("syscalls:sys_enter_"):]
                    calls[name] = int(parts[0]) if parts[0].isdigit() else 0
            else:
                parts = line.split()
                if len(parts) >= 5 and parts[-1] in SYNC_CALLS:
                    calls[parts[-1]] = int(parts[3])
        return calls

    def around(self, pid, run):
        """Calls run() while counting pid's sync calls; returns (run's result, {call: n})."""
        out = os.path.join(self.work, "sync-count.txt")
        if os.path.exists(out):
            os.remove(out)
        counter = spawn(self._cmd(self.tool, pid, out), stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
        time.sleep(0.5)  # attached
        result = run()
        counter.send_signal(signal.SIGINT)
        counter.wait(30)
        return result, self._parse(self.tool, out)


def fsync_loop(directory, threads, seconds, busy=False):
    """write(512 bytes) + fdatasync, repeated, in `threads` threads (one file each, appended
    to) for `seconds`: the syscalls release the GIL, so the threads wait on the disk
    together. Returns the loop's rounds per second, all threads together. busy: with one
    spinning shell per CPU at nice 19 beside it, so that no CPU goes idle (on a quiet moment
    of this VM a lone thread waiting on the disk waited several times longer from an idle
    CPU)."""
    spinners = []
    if busy:
        spinners = [spawn(["nice", "-n", "19", "sh", "-c", "while :; do :; done"])
                    for _ in range(os.cpu_count() or 1)]
    try:
        return _fsync_loop(directory, threads, seconds)
    finally:
        for proc in spinners:
            proc.kill()
            proc.wait()


def _fsync_loop(directory, threads, seconds):
    counts = [0] * threads
    ready = threading.Barrier(threads + 1)
    stop_at = [0.0]
    buf = b"\xa5" * 512

    def run(i):
        path = os.path.join(directory, f"fsync-loop-{i}.bin")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        ready.wait()
        n = 0
        while time.monotonic() < stop_at[0]:
            os.write(fd, buf)
            os.fdatasync(fd)
            n += 1
        counts[i] = n
        os.close(fd)
        os.remove(path)

    pool = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    t0 = time.monotonic()
    stop_at[0] = t0 + seconds
    ready.wait()
    for t in pool:
        t.join()
    return sum(counts) / (time.monotonic() - t0)


# ----- the steps -------------------------------------------------------------------------


def setup(args, data, work, with_probe_jobs=False):
    for r in REGIONS:
        ir(args, data, "region", "add", r)
    ir(args, data, "tenant", "add", PROBE, "--region", REGIONS[0])
    for i, t in enumerate(TENANTS):
        ir(args, data, "tenant", "add", t, "--region", REGIONS[i % len(REGIONS)])
    ir(args, data, "user", "add", "bench", "--tenant", PROBE, "--tenant", TENANTS[0])
    ir(args, data, "token", "issue", "--user", "bench", "--tenant", PROBE, "--token", TOKEN_PROBE)
    ir(args, data, "token", "issue", "--user", "bench", "--tenant", TENANTS[0], "--token",
       TOKEN_BIG)
    small = os.path.join(work, "cirros-0.6.2.img")
    if not os.path.exists(small):
        with open(small, "wb") as f:
            f.write(os.urandom(4096))
    ir(args, data, "image", "import", small, "--tenant", PROBE, "--name", "cirros-0.6.2",
       "--id", IMAGE)


def measure_size(args, data, work, size, seeded, results):
    """The server is stopped: bytes on disk, start-up, idle memory, /metrics, GET /jobs.
    Returns the server left running (with its worker, idle)."""
    row = {"kind": "size", "jobs": size}
    row.update(seeded)
    apparent, allocated = du_bytes(os.path.join(data, "db"))
    row.update(db_apparent=apparent, db_allocated=allocated)
    srv = Server(args, data, os.path.join(work, "serve.log"))
    starts = []
    for i in range(3):
        accept, line, healthz = srv.start()
        stop_s = srv.stop()
        starts.append({"accept_s": accept, "line_s": line, "healthz_s": healthz,
                       "stop_s": stop_s})
    row["starts"] = starts
    for key in ("accept_s", "line_s", "healthz_s", "stop_s"):
        row[key] = statistics.median(s[key] for s in starts)
    # Idle: a fourth start, no request at all, VmRSS 2 s after the exec.
    srv.start(probe=False)
    time.sleep(max(0.0, srv.t0 + 2 - time.monotonic()))
    row["idle_rss_kib"] = status_kib(srv.pid, "VmRSS")
    row["idle_at_s"] = time.monotonic() - srv.t0  # 2 s, unless the start took longer
    row["idle_hwm_kib"] = status_kib(srv.pid, "VmHWM")
    # A job changes (one more job, seeded through the admin socket: a change the worker does
    # not follow up, as it would a cancel), then /metrics twice.
    change = os.path.join(work, "change.json")
    with open(change, "w", encoding="utf-8") as f:
        json.dump([job_at(10**9 + size, random.Random(-size))], f)
    ir(args, data, "job", "seed", change)
    for name in ("metrics_first_s", "metrics_second_s"):
        t0 = time.monotonic()
        status, body = call("GET", srv.url("/metrics"))
        row[name] = time.monotonic() - t0
        if status != 200:
            die(f"/metrics answered {status}")
    row["rss_after_metrics_kib"] = status_kib(srv.pid, "VmRSS")
    counts = {}
    for line in body.decode().splitlines():
        if line.startswith("image_replicator_jobs{"):
            counts[line.split('"')[1]] = int(float(line.rsplit(" ", 1)[1]))
    row["metrics_job_counts"] = counts
    if sum(counts.values()) < size:
        die(f"/metrics counts {sum(counts.values())} jobs, expected at least {size}")
    # The wire size of a job: the probe tenant's list (100 jobs) as the server sends it.
    status, body = call("GET", srv.url(JOBS), token=TOKEN_PROBE)
    listed = json.loads(body)
    listed = listed.get("jobs", listed) if isinstance(listed, dict) else listed
    row["wire_bytes_per_job"] = len(body) / max(1, len(listed))
    row["probe_listed"] = len(listed)
    for name, token in (("probe", TOKEN_PROBE), ("big", TOKEN_BIG)):
        wrk(srv, JOBS, 8, 1, token)  # warm: the list page is built once per change
        r = wrk(srv, JOBS, 8, args.list_duration, token)
        row[f"list_{name}"] = {k: r[k] for k in ("rate", "lat_p50_us", "lat_p99_us", "non2xx",
                                                  "requests")}
    row["rss_after_lists_kib"] = status_kib(srv.pid, "VmRSS")
    results.append(row)
    log(f"{size:,} jobs: {allocated / size:,.0f} B/job on disk, start-up "
        f"{row['healthz_s'] * 1000:.0f} ms, idle {row['idle_rss_kib'] / 1024:.1f} MiB, "
        f"/metrics {row['metrics_first_s'] * 1000:.1f} / {row['metrics_second_s'] * 1000:.1f} ms")
    return srv


def grow(args, work, results):
    data = os.path.join(work, "grow")
    setup(args, data, work)
    srv = Server(args, data, os.path.join(work, "serve.log"))
    srv.start()
    have = 0
    for size in args.sizes:
        log(f"seeding up to {size:,} jobs ({args.seed_batch:,} a call)")
        hwm0 = status_kib(srv.pid, "VmHWM")
        rss0 = status_kib(srv.pid, "VmRSS")
        seed_s, gen_s, cli_kib, calls = 0.0, 0.0, 0, 0
        while have < size:
            count = min(args.seed_batch, size - have)
            path = os.path.join(work, "seed.json")
            t0 = time.monotonic()
            write_seed(path, have, count)
            gen_s += time.monotonic() - t0
            took, kib = seed_through(args, data, path)
            os.remove(path)
            seed_s += took
            cli_kib = max(cli_kib, kib)
            calls += 1
            have += count
        added = size - (results[-1]["jobs"] if results else 0)
        hwm1 = status_kib(srv.pid, "VmHWM")
        seeded = {"seeded": added, "seed_calls": calls, "seed_batch": args.seed_batch,
                  "seed_s": seed_s, "seed_file_s": gen_s, "seed_cli_peak_kib": cli_kib,
                  "srv_hwm_before_kib": hwm0, "srv_hwm_after_kib": hwm1,
                  "srv_rss_before_kib": rss0}
        log(f"seeded {added:,} jobs in {seed_s:.1f} s ({calls} call(s)); server VmHWM "
            f"{hwm0 / 1024:.1f} -> {hwm1 / 1024:.1f} MiB, the CLI's peak {cli_kib / 1024:.1f} MiB")
        srv.stop()
        srv = measure_size(args, data, work, size, seeded, results)
    return srv, data


def post_runs(args, srv, label, conns_list, work, counter, results, loop=True):
    """POST /jobs at each concurrency, beside the fsync loop (ABBA per rep)."""
    wrk(srv, JOBS, 32, 1, TOKEN_PROBE, post=True)  # warm
    for conns in conns_list:
        for rep in range(args.reps):
            sides = ["post", "loop", "busy"]
            sides = sides[rep % 3:] + sides[:rep % 3]
            row = {"kind": "post", "store": label, "connections": conns, "rep": rep + 1}
            for side in sides:
                if side in ("loop", "busy"):
                    if loop:
                        row[f"{side}_rate"] = fsync_loop(work, conns, args.duration,
                                                         busy=side == "busy")
                    continue
                cpu0 = cpu_s(srv.pid)
                r = wrk(srv, JOBS, conns, args.duration, TOKEN_PROBE, post=True)
                row.update(rate=r["rate"], ok=r["ok"], non2xx=r["non2xx"],
                           lat_p50_us=r["lat_p50_us"], lat_p99_us=r["lat_p99_us"],
                           cpu_s=cpu_s(srv.pid) - cpu0)
            row["cpu_us_per_post"] = row["cpu_s"] / max(1, row["ok"]) * 1e6
            results.append(row)
            log(f"POST {label}, {conns} connection(s), rep {rep + 1}: {row['rate']:,.0f}/s"
                + (f", fsync loop {row['loop_rate']:,.0f}/s (CPUs busy: "
                   f"{row['busy_rate']:,.0f}/s)" if loop else "")
                + f", {row['cpu_us_per_post']:.0f} µs CPU per POST")
        if counter.tool:
            r, calls = counter.around(srv.pid, lambda: wrk(srv, JOBS, conns, args.audit_duration,
                                                           TOKEN_PROBE, post=True))
            # fsync and fdatasync flush the disk's write cache; sync_file_range does not.
            flushes = calls.get("fdatasync", 0) + calls.get("fsync", 0)
            results.append({"kind": "sync-audit", "store": label, "connections": conns,
                            "tool": counter.tool, "ok": r["ok"], "rate": r["rate"],
                            "calls": calls,
                            "posts_per_fdatasync": r["ok"] / flushes if flushes else None})


# ----- the report ------------------------------------------------------------------------


def verdict(ok):
    return "**met**" if ok else "**missed**"


def report(args, meta, results):
    sizes = [r for r in results if r["kind"] == "size"]
    posts = [r for r in results if r["kind"] == "post"]
    audits = {(r["store"], r["connections"]): r for r in results if r["kind"] == "sync-audit"}
    med = statistics.median
    seed_calls = ("one call per size" if args.seed_batch >= max(r.get("seeded", 0) for r in results)
                  else f"calls of at most {args.seed_batch:,} jobs")
    lines = [START, "## Costs as the store grows (issue 18)", ""]
    quick = " (--quick: tiny sizes, these figures only show that the script runs)" if args.quick else ""
    lines.append(
        f"Measured {meta['started']} to {meta['ended']} with `{meta['command']}`{quick} on commit "
        f"`{meta['commit']}`, binary `{meta['bin']}`{args.label}. Machine: "
        f"{meta['cores']} cores, Linux {meta['kernel']}, the data on {meta['fstype']} "
        f"({meta['tmpdir']}); load average at start / end {' '.join(meta['load_start'])} / "
        f"{' '.join(meta['load_end'])} (the machine is shared with other builds and tests). "
        f"The whole run took {meta['wall_s'] / 60:.1f} minutes.")
    lines.append("")
    lines.append(
        f"One data directory grows from size to size: `job seed FILE` through the running "
        f"server ({seed_calls}), {len(TENANTS)} "
        f"tenants in {len(REGIONS)} regions (plus a probe tenant with {PROBE_JOBS} jobs at every "
        "size), 80 % replicated, 10 % error, 8 % canceled, 2 % replicate_requested (seeded "
        "without `--enqueue`, so the worker stays idle). At each size the server (worker on) "
        "is stopped; the store's directory `<data-dir>/db` is measured with `du` (apparent "
        "and allocated bytes); the server is started 3 times (median; page cache warm): until "
        "its port accepts a TCP connection, and until `/healthz` answers 200; then a fourth "
        "time with no request: VmRSS 2 s after the exec; then one job is added (`job seed` of "
        "a file holding one job: a job change that the worker does not follow up, as it "
        "would a cancel) and `/metrics` is fetched twice, timed from the request "
        f"to the last byte; then `GET /jobs` is timed with wrk (2 threads, 8 connections, "
        f"{args.list_duration} s after a 1 s warm-up) for the probe tenant (100 jobs) and for "
        f"a tenant holding 1 % of the store (its first page: at most 1,000 jobs). Seeding: "
        "the server's VmHWM before and after the step's seed calls, and the CLI's own peak RSS "
        "(`/usr/bin/time -f %M`).")
    lines.append("")
    head = ("| jobs | idle RSS MiB (2 s / after `/metrics`) | start-up ms (port accepts / "
            "`/healthz` 200) | `/metrics` ms (first after a change / second) | on disk B/job "
            "(allocated / apparent) | seed s per 100k | server peak RSS growth MiB over the "
            "seed (VmHWM before → after) | CLI peak RSS MiB | seed calls × jobs | `GET /jobs` "
            "p50 / p99 ms, 100 jobs | `GET /jobs` p50 / p99 ms, 1 % tenant |")
    lines.append(head)
    lines.append("|" + "---|" * 11)
    for r in sizes:
        per100k = 100_000 / r["seeded"]
        batch = min(r["seed_batch"], r["seeded"])
        lines.append(
            f"| {r['jobs']:,} | {r['idle_rss_kib'] / 1024:.1f} / "
            f"{r['rss_after_metrics_kib'] / 1024:.1f} | {r['accept_s'] * 1000:.0f} / "
            f"{r['healthz_s'] * 1000:.0f} | {r['metrics_first_s'] * 1000:.1f} / "
            f"{r['metrics_second_s'] * 1000:.1f} | {r['db_allocated'] / r['jobs']:,.0f} / "
            f"{r['db_apparent'] / r['jobs']:,.0f} | {r['seed_s'] * per100k:.1f} | "
            f"{(r['srv_hwm_after_kib'] - r['srv_hwm_before_kib']) / 1024:,.0f} "
            f"({r['srv_hwm_before_kib'] / 1024:,.0f} → {r['srv_hwm_after_kib'] / 1024:,.0f}) | "
            f"{r['seed_cli_peak_kib'] / 1024:.0f} | {r['seed_calls']} × ≤ {batch:,} | "
            f"{r['list_probe']['lat_p50_us'] / 1000:.2f} / "
            f"{r['list_probe']['lat_p99_us'] / 1000:.2f} | {r['list_big']['lat_p50_us'] / 1000:.2f} / "
            f"{r['list_big']['lat_p99_us'] / 1000:.2f} |")
    lines.append("")
    top = sizes[-1]
    wire = top["wire_bytes_per_job"]
    lines.append(
        f"A job is {wire:,.0f} bytes of JSON on the wire (the probe tenant's list ÷ its jobs), "
        f"so the store holds {top['db_allocated'] / top['jobs'] / wire:.1f}× (allocated) and "
        f"{top['db_apparent'] / top['jobs'] / wire:.1f}× (apparent) that at {top['jobs']:,} jobs. "
        f"Stopping the server took {top['stop_s'] * 1000:,.0f} ms (median) there. The server "
        "that seeds is a fresh process (the idle one of the size before), so its peak RSS "
        "growth is what the step's seed calls cost, all of them: they run one after another, "
        "and what one call leaves behind the next one's peak adds to.")
    lines.append("")
    # Goals
    fresh = {c: [r for r in posts if r["store"] == "fresh" and r["connections"] == c]
             for c in sorted({r["connections"] for r in posts})}
    p4 = fresh.get(32) or []
    p4_rate = med(r["rate"] for r in p4) if p4 else float("nan")
    p4_ratio = med(r["rate"] / r["loop_rate"] for r in p4) if p4 else float("nan")
    p4_busy = med(r["rate"] / r["busy_rate"] for r in p4) if p4 else float("nan")
    p4_cpu = med(r["cpu_us_per_post"] for r in p4) if p4 else float("nan")
    at = f"at {top['jobs']:,} jobs" + (" (--quick: the issue's goals are for 1M)" if args.quick else "")
    seed_srv = (top["srv_hwm_after_kib"] - top["srv_hwm_before_kib"]) / 1024
    goals = [
        (f"`/metrics`, first scrape after a job change, {at}", "< 10 ms",
         f"{top['metrics_first_s'] * 1000:,.1f} ms", top["metrics_first_s"] < 0.010),
        (f"`/metrics`, the second scrape, {at}", "< 10 ms",
         f"{top['metrics_second_s'] * 1000:,.1f} ms", top["metrics_second_s"] < 0.010),
        (f"idle RSS {max(2, top['idle_at_s']):.0f} s after start, {at}", "< 32 MiB",
         f"{top['idle_rss_kib'] / 1024:.1f} MiB", top["idle_rss_kib"] < 32 * 1024),
        (f"idle RSS after the `/metrics` scrapes, {at}", "< 32 MiB",
         f"{top['rss_after_metrics_kib'] / 1024:.1f} MiB", top["rss_after_metrics_kib"] < 32 * 1024),
        (f"start-up (exec to `/healthz` 200), {at}", "< 300 ms",
         f"{top['healthz_s'] * 1000:,.0f} ms (port accepts at {top['accept_s'] * 1000:,.0f} ms)",
         top["healthz_s"] < 0.3),
        (f"on disk per job (allocated), {at}", "≤ 1 KiB",
         f"{top['db_allocated'] / top['jobs']:,.0f} B", top["db_allocated"] / top["jobs"] <= 1024),
        (f"`job seed` peak memory: the CLI, one call of {min(args.seed_batch, top['seeded']):,} jobs",
         "< 64 MiB", f"{top['seed_cli_peak_kib'] / 1024:.0f} MiB",
         top["seed_cli_peak_kib"] < 64 * 1024),
        (f"`job seed` peak memory: the server's VmHWM growth over the step to {top['jobs']:,}",
         "< 64 MiB", f"{seed_srv:.0f} MiB", seed_srv < 64),
        ("server CPU per POST, fresh store, 32 connections", "≤ 200 µs", f"{p4_cpu:,.0f} µs",
         p4_cpu <= 200),
        ("P4: POSTs/s ÷ write+fdatasync loop/s, 32 connections / 32 threads, fresh store",
         "≥ 0.5", f"{p4_ratio:.2f} ({p4_rate:,.0f}/s; ÷ the loop with the CPUs kept busy: "
         f"{p4_busy:.2f})", p4_ratio >= 0.5),
    ]
    lines.append("| figure | goal | measured | |")
    lines.append("|---|---|---|---|")
    for what, goal, got, ok in goals:
        lines.append(f"| {what} | {goal} | {got} | {verdict(ok)} |")
    lines.append("")
    sync_note = ""
    tools = {a["tool"] for a in audits.values()}
    if "perf" in tools:
        sync_note = ("`perf stat -e syscalls:sys_enter_{fdatasync,fsync,sync_file_range} -p PID` "
                     "(counts at the tracepoints; it barely slows the server)")
    elif "strace" in tools:
        sync_note = ("`strace -f -qq -c -e trace=fdatasync,fsync,sync_file_range -p PID` "
                     "(strace slows the server: its ratio counts, not its rate)")
    lines.append(
        f"POST /jobs (wrk with scripts/bench/post-job.lua, copies of a 4 KiB image into the "
        f"same tenant, `serve --no-worker` as in bench.sh's P4, {args.duration} s a run, "
        f"{args.reps} rep(s); medians) on a "
        "fresh store (bench.sh's P4 store: no other jobs; it grows by the jobs created), "
        f"beside a write+fdatasync loop on the same file system: 512 bytes appended to a file "
        "and `os.fdatasync`, repeated, in as many Python threads as wrk has connections (a file "
        "each; the two calls release the GIL, so the threads wait on the disk together), once "
        "alone and once with the CPUs kept busy (a spinning shell per CPU at nice 19; the "
        "server's CPUs are busy under wrk: on a quiet moment of this VM a lone thread's loop "
        "ran at 256/s alone and at 1,487/s beside two spinners, as if a wake-up from an idle "
        "CPU cost milliseconds). The three runs of a rep go back to back, "
        "their order rotating. "
        f"Server CPU: utime+stime of /proc/PID/stat over the wrk run ÷ the 2xx answers. POSTs "
        f"per fdatasync: one more run of {args.audit_duration} s per row under "
        f"{sync_note or 'no counter (neither perf nor strace could attach)'}, 2xx answers ÷ "
        "(fdatasync + fsync) calls, the calls that flush the disk's write cache; sync_file_range "
        "only writes a range out and is listed beside them. The first row is one run on the "
        "grown store.")
    lines.append("")
    lines.append("| store | connections | POSTs/s | fsync loop/s | ratio | fsync loop/s, CPUs "
                 "busy | ratio to it | POSTs per fdatasync (the run's sync calls) | server CPU "
                 "µs per POST | p99 ms |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    grown = f"{top['jobs']:,} jobs"
    groups = {}
    for r in posts:
        groups.setdefault((r["store"], r["connections"]), []).append(r)
    for (store, conns), rs in groups.items():
        a = audits.get((store, conns))
        if a and a["posts_per_fdatasync"] is not None:
            calls = ", ".join(f"{n:,} {c}" for c, n in sorted(a["calls"].items()) if n)
            per_sync = f"{a['posts_per_fdatasync']:.2f} ({a['ok']:,} POSTs; {calls})"
        else:
            per_sync = "–"
        has_loop = all("loop_rate" in r for r in rs)
        lines.append(
            f"| {'fresh' if store == 'fresh' else grown} | {conns} | "
            f"{med(r['rate'] for r in rs):,.0f} | "
            + (f"{med(r['loop_rate'] for r in rs):,.0f} | "
               f"{med(r['rate'] / r['loop_rate'] for r in rs):.2f} | "
               f"{med(r['busy_rate'] for r in rs):,.0f} | "
               f"{med(r['rate'] / r['busy_rate'] for r in rs):.2f} | "
               if has_loop else "– | – | – | – | ")
            + f"{per_sync} | {med(r['cpu_us_per_post'] for r in rs):,.0f} | "
            f"{med(r['lat_p99_us'] for r in rs) / 1000:.1f} |")
    lines.append("")
    lines.append("<details><summary>Raw results (JSON lines)</summary>")
    lines.append("")
    lines.append("```")
    for r in results:
        lines.append(json.dumps(r, sort_keys=True))
    lines.append("```")
    lines.append("")
    lines.append("</details>")
    lines.append("")
    lines.append(END)
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", required=True)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, under a minute")
    ap.add_argument("--tmpdir", default=os.environ.get("TMPDIR", "/tmp"))
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--out", help="the Markdown file (default BENCHMARKS.md; --quick: a temp file)")
    ap.add_argument("--reps", type=int)
    ap.add_argument("--duration", type=int, help="seconds of each POST run and fsync loop")
    ap.add_argument("--label", default="", help="words after the binary's name in the report")
    ap.add_argument("--seed-batch", type=int, default=1_000_000_000,
                    help="jobs per `job seed` call (default: one call per size)")
    ap.add_argument("--sizes", help="comma-separated store sizes")
    ap.add_argument("--command", help=argparse.SUPPRESS)  # as bench.sh was called
    args = ap.parse_args()
    if args.quick:
        args.sizes = args.sizes or "1000,5000,10000"
        args.reps = args.reps or 1
        args.duration = args.duration or 1
        args.list_duration, args.audit_duration = 1, 1
        conns_list = [1, 8, 32, 128]
    else:
        args.sizes = args.sizes or "10000,100000,300000,1000000"
        args.reps = args.reps or 2
        args.duration = args.duration or 8
        args.list_duration, args.audit_duration = 5, 3
        conns_list = [1, 8, 32, 128]
    args.sizes = [int(s) for s in args.sizes.split(",")]
    if args.sizes[0] < PROBE_JOBS + 100 or args.sizes != sorted(args.sizes):
        die("--sizes must grow, from at least 200 jobs")
    args.bin = os.path.abspath(args.bin)
    if not os.access(args.bin, os.X_OK):
        die(f"{args.bin} is not an executable")
    if not shutil.which("wrk"):
        die("wrk is missing (Debian's wrk)")
    os.makedirs(args.tmpdir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="image-replicator-growth.", dir=args.tmpdir)
    started = time.time()
    meta = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "load_start": open("/proc/loadavg").read().split()[:3],
            "cores": os.cpu_count(), "kernel": os.uname().release,
            "tmpdir": args.tmpdir,
            "fstype": subprocess.run(["df", "--output=fstype", work], capture_output=True,
                                     text=True).stdout.split()[-1],
            "bin": os.path.relpath(args.bin, ROOT) if args.bin.startswith(ROOT) else args.bin,
            "command": args.command or "python3 scripts/bench/growth.py " + " ".join(sys.argv[1:]),
            "commit": subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                                     capture_output=True, text=True).stdout.strip()}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background
    results = []
    try:
        need = args.sizes[-1] * 6 * 1024 + 1024 * MIB  # about 3.4 KiB a job today
        free = shutil.disk_usage(work).free
        if free < need:
            die(f"{work} has {free // MIB} MiB free; the run needs about {need // MIB} MiB")
        log(f"data in {work}; sizes {', '.join(f'{s:,}' for s in args.sizes)}")
        counter = SyncCounter(work)
        log(f"sync calls counted with {counter.tool or 'nothing (neither perf nor strace attaches)'}")
        srv, data = grow(args, work, results)
        srv.stop()
        # The POST figures: once on the grown store (P4's 32 connections), then a fresh store.
        big = Server(args, data, os.path.join(work, "serve.log"), ["--no-worker"])
        big.start()
        post_runs(args, big, "grown", [32], work, counter, results, loop=False)
        big.stop()
        fresh_dir = os.path.join(work, "fresh")
        setup(args, fresh_dir, work)
        fresh = Server(args, fresh_dir, os.path.join(work, "serve-fresh.log"), ["--no-worker"])
        fresh.start()
        post_runs(args, fresh, "fresh", conns_list, work, counter, results)
        fresh.stop()
        problems = [l for name in ("serve.log", "serve-fresh.log")
                    for l in open(os.path.join(work, name), errors="replace")
                    if " WARN " in l or " ERROR " in l]
        if problems:
            log(f"the server logged {len(problems)} warning/error line(s), e.g. {problems[0][:300]}")
            results.append({"kind": "log", "lines": len(problems), "first": problems[0][:300]})
    finally:
        stop_all()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    meta["ended"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    meta["load_end"] = open("/proc/loadavg").read().split()[:3]
    meta["wall_s"] = time.time() - started
    section = report(args, meta, results)
    if args.quick and not args.out:
        fd, args.out = tempfile.mkstemp(suffix=".md", prefix="image-replicator-growth-quick.",
                                        dir=args.tmpdir)
        os.close(fd)
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(section + "\n")
        print(section)
    else:
        helper.put_section(args.out or os.path.join(ROOT, "BENCHMARKS.md"), START, END, section)
    log(f"wrote the section to {args.out or 'BENCHMARKS.md'} ({meta['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
