#!/usr/bin/env python3
"""Several appliances on one PostgreSQL (issue 16), `scripts/bench.sh --only S`: S1 (durable
creates, sled and PostgreSQL side by side), S2 (kill -9 of the appliance copying a job, 20
times) and P1/P3 on PostgreSQL beside sled. Standard library only (python3 >= 3.9), plus wrk,
the PostgreSQL server binaries (initdb, postgres, psql) and the binary under test.

    shared-db.py --bin BIN [--reps N] [--duration S] [--kills N] [--quick] [--no-write]

It makes its own PostgreSQL cluster (initdb in a temporary directory, a Unix socket only; as
root the server runs as the `postgres` user) and removes it at the end. The section
"Several appliances, one PostgreSQL" of BENCHMARKS.md is replaced between its markers.

- S1: POST /jobs (wrk, 32 connections, --no-worker servers, like P4) against the sled store,
  one appliance on PostgreSQL, and two appliances on the same database (16 connections
  each, at the same time), in a rotating order per rep. Every 202 must be a job in the
  store afterwards (counted in the database, and in sled's list).
- S2: two appliances with workers on one database, a copy of a 32 MiB image capped at
  8 MiB/s (2 MiB/s for an 8 MiB image with --quick); once the copy holds a verified part, the appliance holding the job is killed with
  SIGKILL; the other must take the job over (its holder becomes the survivor: that time is
  the takeover time) and finish it from the verified part. Then the killed one is started
  again and the next round goes the other way. Counted: acknowledged jobs lost, jobs
  finished twice (a "replicated" line in both logs), copies whose bytes differ.
- P1/P3 on PostgreSQL: GET /jobs of a 10-job tenant with 32 connections (P1) and of a
  100-job tenant with one connection (P3), sled and PostgreSQL in one run.
"""

import argparse
import glob
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.dont_write_bytecode = True  # no __pycache__ in scripts/bench
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import helper  # noqa: E402  (put_section)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
START = "<!-- scripts/bench.sh --only S: start -->"
END = "<!-- scripts/bench.sh --only S: end -->"
T1 = "1b0e5c9a2f3d4e6b8a7c0d1e2f3a4b5c"
T2 = "2c1f6d0b3e4a5f7c9b8d1e2f3a4b5c6d"
T3 = "3d2a7e1c4b5f6a8d0c9e2f3a4b5c6d7e"
T4 = "4e3b8f2d5c6a7b9e1d0f3a4b5c6d7e8f"
TOKEN = "bench" + "0" * 27  # T1: the creates of S1 and S2
TOKEN3 = "bench" + "3" * 27  # T3: 100 jobs (P3)
TOKEN4 = "bench" + "4" * 27  # T4: 10 jobs (P1)
IMAGE_SMALL = "7c9e6679-7425-40de-944b-e07fc1f90ae7"
IMAGE_BIG = "8d0f7780-8536-41ef-a55c-f18fd2fa1bf8"


def log(msg):
    print(f"[shared-db {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def call(method, url, token=None, body=None, timeout=30):
    return helper.http(method, url, token, body, timeout)


class Cluster:
    """A throwaway PostgreSQL cluster on a Unix socket."""

    def __init__(self, work):
        self.dir = os.path.join(work, "pg")
        os.makedirs(self.dir)
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        self.bin = next((d for d in reversed(bins) if os.path.exists(f"{d}/initdb")), None)
        if self.bin is None and shutil.which("initdb"):
            self.bin = os.path.dirname(shutil.which("initdb"))
        if self.bin is None:
            sys.exit("shared-db.py: no initdb (install Debian's postgresql)")
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.dir, "postgres", "postgres")
            os.chmod(work, 0o755)
        self.data = os.path.join(self.dir, "data")
        self.run(f"{self.bin}/initdb", "-D", self.data, "-A", "trust", "-U", "postgres",
                 "--no-sync", stdout=subprocess.DEVNULL)
        self.proc = None
        self.start()
        self.url = self.database("ir")

    def database(self, name):
        """A new database's URL."""
        self.run(f"{self.bin}/psql", "-h", self.dir, "-U", "postgres", "-qc",
                 f"CREATE DATABASE {name}", stdout=subprocess.DEVNULL)
        return f"postgres:///{name}?host={self.dir}&user=postgres"

    def run(self, *cmd, **kw):
        subprocess.run(self.as_user + list(cmd), check=True, **kw)

    def start(self):
        self.proc = subprocess.Popen(
            self.as_user + [f"{self.bin}/postgres", "-D", self.data, "-k", self.dir,
                            "-c", "listen_addresses=", "-c", "max_connections=300"],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.dir, "log"), "a"),
            start_new_session=True)
        for _ in range(200):
            if subprocess.run(self.as_user + [f"{self.bin}/pg_isready", "-h", self.dir, "-q"]
                              ).returncode == 0:
                return
            time.sleep(0.05)
        sys.exit("shared-db.py: PostgreSQL did not start: " + open(os.path.join(self.dir, "log")).read())

    def sql(self, query):
        out = subprocess.run(self.as_user + [f"{self.bin}/psql", "-h", self.dir, "-U", "postgres",
                                             "-d", "ir", "-tAc", query],
                             check=True, capture_output=True, text=True)
        return out.stdout.strip()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


class Appliance:
    def __init__(self, args, data_dir, url, node, extra, log_path):
        self.args, self.data_dir, self.url, self.node = args, data_dir, url, node
        self.extra, self.log_path = extra, log_path
        self.proc = None

    def cli(self, *argv, check=True):
        cmd = [self.args.bin, "--data-dir", self.data_dir]
        if self.url:
            cmd += ["--database-url", self.url]
        out = subprocess.run(cmd + list(argv), capture_output=True, text=True)
        if check and out.returncode != 0:
            sys.exit(f"shared-db.py: {' '.join(argv)} failed: {out.stderr}")
        return out.stdout

    def start(self):
        cmd = [self.args.bin, "--data-dir", self.data_dir, "--log-format", "json", "serve",
               "--listen", "127.0.0.1:0", "--node-name", self.node] + self.extra
        env = dict(os.environ, RUST_LOG="info")
        if self.url:
            env["IMAGE_REPLICATOR_DATABASE_URL"] = self.url
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(self.log_path, "a"),
                                     stdin=subprocess.DEVNULL, text=True, env=env)
        for line in self.proc.stdout:
            if line.startswith("image-replicator listening on "):
                self.base = line.split(" on ", 1)[1].strip()
                break
        else:
            sys.exit(f"shared-db.py: {self.node} did not start: " + open(self.log_path).read()[-2000:])
        self.port = int(self.base.rsplit(":", 1)[1])
        return self

    def kill9(self):
        self.proc.kill()
        self.proc.wait()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def setup(app, work, name):
    """Regions (directories shared by the appliances of one store), tenants, a user, tokens
    and the two images."""
    regions = os.path.join(work, f"regions-{name}")
    app.cli("region", "add", "ot1", "--dir", f"{regions}/ot1")
    app.cli("region", "add", "ot2", "--dir", f"{regions}/ot2")
    app.cli("tenant", "add", T1, "--region", "ot1")
    app.cli("tenant", "add", T2, "--region", "ot2")
    app.cli("tenant", "add", T3, "--region", "ot1")
    app.cli("tenant", "add", T4, "--region", "ot1")
    app.cli("user", "add", "bench", "--tenant", T1, "--tenant", T2, "--tenant", T3,
            "--tenant", T4)
    app.cli("token", "issue", "--user", "bench", "--tenant", T1, "--token", TOKEN)
    app.cli("token", "issue", "--user", "bench", "--tenant", T3, "--token", TOKEN3)
    app.cli("token", "issue", "--user", "bench", "--tenant", T4, "--token", TOKEN4)
    small = os.path.join(work, "small.bin")
    big = os.path.join(work, "big.bin")
    app.cli("image", "import", small, "--tenant", T1, "--name", "small", "--id", IMAGE_SMALL)
    app.cli("image", "import", big, "--tenant", T1, "--name", "big", "--id", IMAGE_BIG)
    seed = os.path.join(work, f"seed-{name}.json")
    jobs = [job_record(T4, i) for i in range(10)] + [job_record(T3, i) for i in range(100)]
    with open(seed, "w", encoding="utf-8") as f:
        json.dump(jobs, f)
    app.cli("job", "seed", seed)
    return regions


def job_record(tenant, i):
    h = hashlib.sha256(f"{tenant}{i}".encode()).hexdigest()
    uid = f"{h[:8]}-{h[8:12]}-4{h[13:16]}-8{h[17:20]}-{h[20:32]}"
    return {"copy_progress": 100, "destination_image_id": uid, "destination_region_id": "ot1",
            "destination_tenant_id": tenant, "job_id": uid, "source_image_id": IMAGE_SMALL,
            "source_image_name": "small", "source_region_id": "ot1", "source_tenant_id": tenant,
            "status": "replicated"}


def wrk(app, path, conns, secs, post=False, token=TOKEN):
    cmd = ["wrk", "-t2" if conns > 1 else "-t1", f"-c{conns}", f"-d{secs}s", "--timeout", "10s",
           "-H", f"X-Auth-Token: {token}",
           "-s", os.path.join(ROOT, "scripts/bench", "post-job.lua" if post else "report.lua"),
           f"http://127.0.0.1:{app.port}{path}"]
    env = dict(os.environ,
               BENCH_POST_BODY=json.dumps({"image_id": IMAGE_SMALL, "tenant_id_dst": T1}))
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)


def wrk_result(proc):
    out, _ = proc.communicate()
    for line in out.splitlines():
        if line.startswith("BENCHJSON "):
            return json.loads(line[len("BENCHJSON "):])
    sys.exit("shared-db.py: wrk printed no summary: " + out)


def ok_requests(r):
    return r["requests"] - r["non2xx"] - r["timeouts"]


JOBS = "/v2/extension/image_replicator/jobs"


def s1(args, sled, pg_a, pg_b, cluster):
    """POST /jobs: sled, PostgreSQL with one appliance, with two appliances."""
    rows = {"sled": [], "pg-1": [], "pg-2": []}
    answered = {"sled": 0, "pg": 0}
    variants = ["sled", "pg-1", "pg-2"]
    for rep in range(args.reps):
        order = variants[rep % 3:] + variants[:rep % 3]
        for v in order:
            log(f"S1 rep {rep + 1}/{args.reps}: POST /jobs, {v}")
            if v == "pg-2":
                procs = [wrk(a, JOBS, 16, args.duration, post=True) for a in (pg_a, pg_b)]
                rs = [wrk_result(p) for p in procs]
                rate = sum(ok_requests(r) / (r["duration_us"] / 1e6) for r in rs)
                answered["pg"] += sum(ok_requests(r) for r in rs)
                p99 = max(r["lat_p99_us"] for r in rs)
            else:
                r = wrk_result(wrk(sled if v == "sled" else pg_a, JOBS, 32, args.duration, post=True))
                rate = ok_requests(r) / (r["duration_us"] / 1e6)
                answered["sled" if v == "sled" else "pg"] += ok_requests(r)
                p99 = r["lat_p99_us"]
            rows[v].append({"rate": rate, "p99_ms": p99 / 1000})
    stored_pg = int(cluster.sql("SELECT count(*) FROM jobs")) - 110
    metrics = call("GET", f"http://127.0.0.1:{sled.port}/metrics")[1].decode()
    stored_sled = sum(int(float(line.rsplit(" ", 1)[1])) for line in metrics.splitlines()
                      if line.startswith("image_replicator_jobs{")) - 110
    return rows, {"pg": (answered["pg"], stored_pg), "sled": (answered["sled"], stored_sled)}


def p1p3(args, sled, pg):
    rows = {}
    for rep in range(args.reps):
        for name, app in ([("sled", sled), ("pg", pg)] if rep % 2 == 0 else [("pg", pg), ("sled", sled)]):
            log(f"P1/P3 rep {rep + 1}/{args.reps}: {name}")
            r1 = wrk_result(wrk(app, JOBS, 32, args.duration, token=TOKEN4))
            r3 = wrk_result(wrk(app, JOBS, 1, args.duration, token=TOKEN3))
            rows.setdefault(("P1", name), []).append(ok_requests(r1) / (r1["duration_us"] / 1e6))
            rows.setdefault(("P3", name), []).append(r3["lat_p50_us"] / 1000)
    return rows


def job_of(app, job_id):
    status, body = call("GET", f"http://127.0.0.1:{app.port}{JOBS}/{job_id}", token=TOKEN)
    return json.loads(body) if status == 200 else None


def holder(app, job_id):
    out = app.cli("--json", "job", "show", job_id, check=False)
    try:
        return json.loads(out).get("holder")
    except ValueError:
        return None


def replicated_lines(path, job_id):
    n = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if job_id in line and '"replicated"' in line:
                n += 1
    return n


def s2(args, apps, regions, big_sha):
    """kill -9 of the appliance holding a copy; the other takes it over."""
    takeovers, lost, twice, differ, rounds = [], 0, 0, 0, []
    for k in range(args.kills):
        for a in apps:
            if a.proc is None or a.proc.poll() is not None:
                a.start()
        first = apps[k % 2]
        status, body = call("POST", f"http://127.0.0.1:{first.port}{JOBS}", token=TOKEN,
                            body={"image_id": IMAGE_BIG, "tenant_id_dst": T2})
        if status != 202:
            sys.exit(f"shared-db.py: POST answered {status}: {body[:300]}")
        job_id = json.loads(body)["job_id"]
        deadline = time.time() + 60
        held = None
        while time.time() < deadline:
            j = job_of(first, job_id)
            held = holder(first, job_id)
            if j and held and j["copy_progress"] >= 20:
                break
            if j and j["status"] in ("replicated", "error", "canceled"):
                sys.exit(f"shared-db.py: job {job_id} ended {j['status']} before a kill")
            time.sleep(0.1)
        victim = next((a for a in apps if a.node == held), None)
        if victim is None:
            sys.exit(f"shared-db.py: no appliance held job {job_id} (holder {held})")
        survivor = apps[1] if victim is apps[0] else apps[0]
        victim.kill9()
        killed = time.time()
        took = None
        while time.time() < killed + 120:
            h = holder(survivor, job_id)
            if h == survivor.node and took is None:
                took = time.time() - killed
            j = job_of(survivor, job_id)
            if j is None:
                lost += 1
                break
            if j["status"] in ("replicated", "error", "canceled"):
                took = took if took is not None else time.time() - killed
                break
            time.sleep(0.1)
        j = job_of(survivor, job_id)
        if j is None or j["status"] != "replicated":
            differ += 1
            log(f"S2 round {k + 1}: job {job_id} ended {j and j['status']}")
        else:
            path = os.path.join(regions, "ot2", j["destination_image_id"])
            with open(path, "rb") as f:
                if hashlib.sha512(f.read()).hexdigest() != big_sha:
                    differ += 1
        n = sum(replicated_lines(a.log_path, job_id) for a in apps)
        if n > 1:
            twice += 1
        takeovers.append(took if took is not None else float("inf"))
        rounds.append({"job": job_id, "killed": victim.node, "takeover_s": took})
        log(f"S2 round {k + 1}/{args.kills}: killed {victim.node}, taken over in "
            f"{took if took is None else round(took, 2)} s, replicated lines {n}")
    return {"takeovers": takeovers, "lost": lost, "twice": twice, "differ": differ,
            "rounds": rounds}


def p99(values):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(0.99 * (len(values) - 1))))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", required=True)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, so the script never rots")
    ap.add_argument("--no-write", action="store_true", help="print the section only")
    ap.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"))
    args = ap.parse_args()
    if args.quick:
        args.reps, args.duration, args.kills = 1, 2, 2
    args.bin = os.path.abspath(args.bin)
    work = tempfile.mkdtemp(prefix="ir-shared-db-")
    cluster = None
    apps = []
    try:
        os.chmod(work, 0o755)
        with open(os.path.join(work, "small.bin"), "wb") as f:
            f.write(os.urandom(4096))
        big_size = (8 if args.quick else 32) * 1024 * 1024
        big = os.urandom(big_size)
        with open(os.path.join(work, "big.bin"), "wb") as f:
            f.write(big)
        big_sha = hashlib.sha512(big).hexdigest()
        log("starting PostgreSQL")
        cluster = Cluster(work)
        sled = Appliance(args, os.path.join(work, "sled"), None, "sled", ["--no-worker"],
                         os.path.join(work, "sled.log"))
        setup(sled, work, "sled")
        pg_a = Appliance(args, os.path.join(work, "pg-a"), cluster.url, "pg-a", ["--no-worker"],
                         os.path.join(work, "pg-a.log"))
        pg_b = Appliance(args, os.path.join(work, "pg-b"), cluster.url, "pg-b", ["--no-worker"],
                         os.path.join(work, "pg-b.log"))
        setup(pg_a, work, "pg")
        apps = [sled, pg_a, pg_b]
        for a in apps:
            a.start()
        rows, audit = s1(args, sled, pg_a, pg_b, cluster)
        reads = p1p3(args, sled, pg_a)
        for a in apps:
            a.stop()
        # S2 on a database of its own: S1's creates would queue ahead of its copies.
        cap = "2M" if args.quick else "8M"  # about 4 s per copy either way
        url = cluster.database("takeover")
        copiers = [Appliance(args, os.path.join(work, f"copy-{n}"), url, f"pg-{n}",
                             ["--max-bandwidth", cap], os.path.join(work, f"copy-{n}.log"))
                   for n in ("a", "b")]
        regions = setup(copiers[0], work, "takeover")
        apps = copiers
        taken = s2(args, copiers, regions, big_sha)
    finally:
        for a in apps:
            a.stop()
        if cluster:
            cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    section = report(args, rows, audit, reads, taken, big_size)
    if args.no_write:
        print(section)
    else:
        helper.put_section(args.out, START, END, section)
        log(f"wrote the section to {args.out}")


def report(args, rows, audit, reads, taken, big_size):
    med = statistics.median
    lines = [START, "## Several appliances, one PostgreSQL (S1, S2; P1 and P3 on PostgreSQL)", ""]
    lines.append(f"`python3 scripts/bench/shared-db.py --bin target/release/image-replicator "
                 f"--reps {args.reps} --duration {args.duration} --kills {args.kills}` "
                 f"(`scripts/bench.sh --only S`), {time.strftime('%Y-%m-%d')}, one run; "
                 "PostgreSQL from Debian's packages on this machine, its own cluster on a Unix "
                 "socket, synchronous_commit on (the default). Goals: S1 ≥ 2,000 creates/s; S2 "
                 "0 lost, 0 finished twice, 0 differing, takeover p99 ≤ 15 s.")
    lines.append("")
    lines.append("| S1: POST /jobs, 32 connections | creates/s (median) | runs | p99 latency ms (median) |")
    lines.append("|---|---|---|---|")
    names = {"sled": "sled, one appliance", "pg-1": "PostgreSQL, one appliance",
             "pg-2": "PostgreSQL, two appliances (16 connections each)"}
    for v in ("sled", "pg-1", "pg-2"):
        rates = [r["rate"] for r in rows[v]]
        lines.append(f"| {names[v]} | {med(rates):,.0f} | {', '.join(f'{x:,.0f}' for x in rates)} | "
                     f"{med(r['p99_ms'] for r in rows[v]):.1f} |")
    lines.append("")
    for store, (answered, stored) in audit.items():
        lines.append(f"- {store}: {answered} POSTs answered 2xx, {stored} new jobs in the store "
                     f"afterwards ({'every 202 committed' if stored >= answered else 'JOBS MISSING'}).")
    lines.append("")
    lines.append("| Reads, sled and PostgreSQL side by side | sled | PostgreSQL | PostgreSQL ÷ sled |")
    lines.append("|---|---|---|---|")
    for fig, what in (("P1", "P1: GET /jobs (10 jobs), 32 connections, requests/s"),
                      ("P3", "P3: GET /jobs (100 jobs), 1 connection, p50 ms")):
        a, b = med(reads[(fig, "sled")]), med(reads[(fig, "pg")])
        lines.append(f"| {what} | {a:,.2f} | {b:,.2f} | {b / a:.2f} |")
    lines.append("")
    t = taken["takeovers"]
    finite = [x for x in t if x != float("inf")]
    lines.append(f"S2: {len(t)} kills of the appliance holding a {big_size >> 20} MiB copy "
                 f"({'2' if args.quick else '8'} MiB/s cap, killed at ≥ 20 %): {taken['lost']} acknowledged jobs lost, "
                 f"{taken['twice']} finished twice, {taken['differ']} copies whose bytes differ "
                 f"or that did not end replicated; takeover (kill to the survivor holding the "
                 f"job) median {med(finite) if finite else float('nan'):.1f} s, "
                 f"p99 {p99(t):.1f} s, max {max(t):.1f} s (the lease is 10 s, renewed every "
                 "0.5 s).")
    lines.append("")
    lines.append(END)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
