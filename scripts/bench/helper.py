#!/usr/bin/env python3
"""JSON side of scripts/bench.sh: seed files, /proc snapshots, wrk results, API copies, and
the BENCHMARKS.md report. Standard library only (python3 >= 3.9).

Every measurement is one JSON object per line in a results file; `report` turns that file and
a meta file (machine, sizes, commands) into Markdown.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

JOBS_PATH = "/v2/extension/image_replicator/jobs"
TICK = os.sysconf("SC_CLK_TCK")
MIB = 1024 * 1024


# ----- small helpers -----------------------------------------------------------------------


def parse_value(text):
    """A key=value argument's value: JSON if it parses, else the string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def kv_pairs(items):
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            sys.exit(f"helper.py: '{item}' is not key=value")
        out[key] = parse_value(value)
    return out


def append(path, record):
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def proc_status(pid):
    out = {}
    with open(f"/proc/{pid}/status", encoding="utf-8") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])  # KiB
    return out


def snapshot(pid):
    """CPU, I/O and memory counters of process `pid` and of the whole machine, right now."""
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is the state (field 3 of proc(5)); minflt is field 10, utime and stime are
    # fields 14 and 15.
    snap = {
        "t": time.monotonic(),
        "minflt": int(fields[7]),
        "utime": int(fields[11]) / TICK,
        "stime": int(fields[12]) / TICK,
        "threads": int(fields[17]),
    }
    try:
        with open(f"/proc/{pid}/io", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                snap["io_" + key] = int(value)
    except OSError:
        pass
    snap.update(proc_status(pid))
    with open("/proc/stat", encoding="utf-8") as f:
        cpu = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is already in user)
    total = sum(cpu[:8])
    snap["mach_total"] = total
    snap["mach_idle"] = cpu[3]
    snap["mach_iowait"] = cpu[4]
    snap["mach_steal"] = cpu[7] if len(cpu) > 7 else 0
    return snap


def deltas(before, after):
    """Differences of two snapshots, as the fields a result keeps."""
    ncpu = os.cpu_count() or 1
    wall = after["t"] - before["t"]
    total = after["mach_total"] - before["mach_total"]
    idle = after["mach_idle"] - before["mach_idle"]
    iowait = after["mach_iowait"] - before["mach_iowait"]
    steal = after["mach_steal"] - before["mach_steal"]
    out = {
        "wall_s": wall,
        "srv_user_s": after["utime"] - before["utime"],
        "srv_sys_s": after["stime"] - before["stime"],
        "srv_minflt": after.get("minflt", 0) - before.get("minflt", 0),
        "mach_busy_frac": (total - idle - iowait) / total if total else 0.0,
        "mach_iowait_frac": iowait / total if total else 0.0,
        "mach_steal_frac": steal / total if total else 0.0,
        "ncpu": ncpu,
        "srv_rss_kib_after": after.get("VmRSS"),
        "srv_hwm_kib_after": after.get("VmHWM"),
    }
    for key in ("io_write_bytes", "io_read_bytes", "io_syscw", "io_syscr"):
        if key in after and key in before:
            out[key] = after[key] - before[key]
    return out


# Loopback only: never through a proxy from the environment.
_LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(method, url, token=None, body=None, timeout=30, unreachable=None):
    """(status, body) of one request; a server that does not answer raises, or gives
    `unreachable` when one is given."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if token:
        req.add_header("X-Auth-Token", token)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with _LOOPBACK.open(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, ConnectionError, OSError):
        if unreachable is None:
            raise
        return unreachable


def metrics(port):
    """The server's request counters: {"GET /route status": count}."""
    status, body = http("GET", f"http://127.0.0.1:{port}/metrics")
    if status != 200:
        sys.exit(f"helper.py: /metrics answered {status}")
    out = {}
    for line in body.decode().splitlines():
        if not line.startswith("image_replicator_http_requests_total{"):
            continue
        labels, _, value = line[len("image_replicator_http_requests_total{"):].partition("} ")
        parts = dict(p.split("=", 1) for p in labels.split('",') if "=" in p)
        parts = {k: v.strip('"') for k, v in parts.items()}
        out[f'{parts["method"]} {parts["route"]} {parts["status"]}'] = int(float(value))
    return out


# ----- subcommands -------------------------------------------------------------------------


def cmd_jobs(args):
    """A JSON array of `count` terminal jobs of one source tenant, in `job seed` format."""
    statuses = ["replicated", "canceled", "error"]
    # Deterministic ids: the same arguments give the same jobs, so two stores seeded from the
    # same file hold the same jobs.
    ns = uuid.UUID("6f1d3a52-0c1e-4c36-9a8e-6b0a3c1f2b7d")
    jobs = []
    for n in range(args.count):
        status = statuses[n % len(statuses)]
        job_id = uuid.uuid5(ns, f"{args.seed}/job/{n}")
        image_id = uuid.uuid5(ns, f"{args.seed}/image/{n % 50}")
        dest = uuid.uuid5(ns, f"{args.seed}/dest/{n}")
        jobs.append({
            "copy_progress": 100 if status == "replicated" else 37,
            "destination_image_id": str(dest) if status == "replicated" else None,
            "destination_region_id": args.region,
            "destination_tenant_id": args.tenant,
            "job_id": str(job_id),
            "source_image_id": str(image_id),
            "source_image_name": f"bench-image-{n % 50}",
            "source_region_id": args.region,
            "source_tenant_id": args.tenant,
            "status": status,
        })
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(jobs, f)


def cmd_snap(args):
    print(json.dumps(snapshot(args.pid)))


def cmd_metrics(args):
    print(json.dumps(metrics(args.port)))


def cmd_wrk_record(args):
    """Reads wrk's BENCHJSON line, adds the server's counter deltas, appends one result."""
    text = open(args.wrk_output, encoding="utf-8", errors="replace").read()
    lines = [l for l in text.splitlines() if l.startswith("BENCHJSON ")]
    if not lines:
        sys.exit(f"helper.py: no BENCHJSON line in wrk's output:\n{text}")
    record = json.loads(lines[-1][len("BENCHJSON "):])
    record["rps"] = record["requests"] / (record["duration_us"] / 1e6)
    record["kind"] = "wrk"
    before = json.load(open(args.before))
    after = json.load(open(args.after))
    record.update(deltas(before, after))
    if args.metrics_before and args.metrics_after:
        m0 = json.load(open(args.metrics_before))
        m1 = json.load(open(args.metrics_after))
        record["server_counted"] = {
            k: v - m0.get(k, 0) for k, v in sorted(m1.items())
            if v - m0.get(k, 0) and "/metrics" not in k
        }
    if args.rss_samples:
        samples = [int(x) for x in open(args.rss_samples).read().split() if x.isdigit()]
        record["rss_samples"] = len(samples)
        record["rss_max_kib"] = max(samples) if samples else None
    record.update(kv_pairs(args.fields))
    append(args.results, record)
    errors = record["connect_errors"] + record["read_errors"] + record["write_errors"] \
        + record["timeouts"]
    print(f'{record.get("id")} {record.get("variant")} rep {record.get("rep")}: '
          f'{record["rps"]:.0f} req/s, p50 {record["lat_p50_us"] / 1000:.3f} ms, '
          f'non-2xx {record["non2xx"]}, socket errors {errors}, server CPU '
          f'{(record["srv_user_s"] + record["srv_sys_s"]) / max(record["requests"], 1) * 1e6:.1f}'
          f' µs/request', file=sys.stderr)


def copy_and_wait(port, token, image, dst, poll, timeout, why_failed=None):
    """POSTs a copy and polls the job every `poll` s until it is replicated (exits if it ends
    otherwise, saying `why_failed(job_id)` where given); the job and the timings."""
    base = f"http://127.0.0.1:{port}{JOBS_PATH}"
    started = time.perf_counter()
    status, body = http("POST", base, token, {"image_id": image, "tenant_id_dst": dst})
    if status != 202:
        sys.exit(f"bench: POST answered {status}: {body!r}")
    job_id = json.loads(body)["job_id"]
    posted = time.perf_counter()
    polls = 0
    while True:
        status, body = http("GET", f"{base}/{job_id}", token)
        polls += 1
        if status != 200:
            sys.exit(f"bench: GET job answered {status}: {body!r}")
        job = json.loads(body)
        if job["status"] == "replicated":
            break
        if job["status"] in ("error", "canceled"):
            why = why_failed(job_id) if why_failed else job
            sys.exit(f"bench: the copy ended {job['status']}: {why}")
        if time.perf_counter() - started > timeout:
            sys.exit(f"bench: the copy did not finish within {timeout} s: {job}")
        time.sleep(poll)
    return {"seconds": time.perf_counter() - started, "post_s": posted - started,
            "polls": polls, "job_id": job_id, "job": job}


def cmd_api_copy(args):
    """POSTs a copy and polls the job (every 50 ms unless --poll) until it is replicated; prints
    the timing."""
    before = snapshot(args.pid) if args.pid else None
    done = copy_and_wait(args.port, args.token, args.image, args.dst, args.poll, args.timeout)
    out = {k: done[k] for k in ("seconds", "post_s", "polls", "job_id")}
    out["dest_image_id"] = done["job"]["destination_image_id"]
    if before:
        out.update(deltas(before, snapshot(args.pid)))
    print(json.dumps(out))


def post_copy(port, token, image, dst):
    status, body = http("POST", f"http://127.0.0.1:{port}{JOBS_PATH}", token,
                        {"image_id": image, "tenant_id_dst": dst})
    if status != 202:
        sys.exit(f"helper.py: POST answered {status}: {body!r}")
    return json.loads(body)["job_id"]


def get_job(port, token, job_id):
    status, body = http("GET", f"http://127.0.0.1:{port}{JOBS_PATH}/{job_id}", token)
    if status != 200:
        sys.exit(f"helper.py: GET job answered {status}: {body!r}")
    return json.loads(body)


def counters(port, prefix="image_replicator_"):
    """The server's unlabelled counters and gauges: {name: value}."""
    status, body = http("GET", f"http://127.0.0.1:{port}/metrics")
    if status != 200:
        sys.exit(f"helper.py: /metrics answered {status}")
    out = {}
    for line in body.decode().splitlines():
        name, _, value = line.partition(" ")
        if name.startswith(prefix) and "{" not in name:
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


def cmd_kill_at(args):
    """POSTs a copy, watches the destination's partial file (every 10 ms) and kills the server
    with SIGKILL as soon as it holds `percent` % of `size` bytes; prints what it saw."""
    started = time.perf_counter()
    job_id = post_copy(args.port, args.token, args.image, args.dst)
    dest, last = None, None
    while dest is None:
        job = get_job(args.port, args.token, job_id)
        if job["status"] in ("replicated", "error", "canceled"):
            sys.exit(f"helper.py: the copy ended {job['status']} before it could be killed: {job}")
        dest = job.get("destination_image_id")
        if time.perf_counter() - started > args.timeout:
            sys.exit(f"helper.py: the copy did not start within {args.timeout} s: {job}")
        if dest is None:
            time.sleep(0.01)
    part = os.path.join(args.region_dir, f".{dest}.part")
    want = args.size * args.percent / 100
    polls = 0
    while True:
        polls += 1
        try:
            held = os.stat(part).st_size
        except FileNotFoundError:
            held = 0
        if held >= want:
            os.kill(args.pid, 9)
            killed = time.perf_counter()
            break
        if polls % 50 == 0:
            job = get_job(args.port, args.token, job_id)
            last = job
            if job["status"] != "replicating":
                sys.exit(f"helper.py: the copy ended {job['status']} before it reached "
                         f"{args.percent} %: {job}")
        if time.perf_counter() - started > args.timeout:
            sys.exit(f"helper.py: the copy did not reach {args.percent} % within {args.timeout} s")
        time.sleep(0.01)
    print(json.dumps({"job_id": job_id, "dest_image_id": dest, "part_bytes": held,
                      "part_percent": round(held * 100 / args.size, 2),
                      "seconds_to_kill": killed - started, "polls": polls,
                      "last_copy_progress": (last or {}).get("copy_progress")}))


def cmd_wait_job(args):
    """Polls a job until it is replicated; prints the seconds since `since` (a Unix time) and
    the server's copy counters then."""
    polls = 0
    while True:
        job = get_job(args.port, args.token, args.job)
        polls += 1
        if job["status"] == "replicated":
            seen = time.time()
            break
        if job["status"] in ("error", "canceled"):
            sys.exit(f"helper.py: the resumed copy ended {job['status']}: {job}")
        if time.time() - args.since > args.timeout:
            sys.exit(f"helper.py: the resumed copy did not finish within {args.timeout} s: {job}")
        time.sleep(args.poll)
    print(json.dumps({"seconds": seen - args.since, "polls": polls,
                      "counters": counters(args.port)}))


def cmd_time_json(args):
    """Runs a command (stdout discarded); prints its wall time and, with --pid, the CPU and I/O
    of that process meanwhile, as JSON."""
    before = snapshot(args.pid) if args.pid else None
    started = time.perf_counter()
    rc = subprocess.call(args.command, stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - started
    if rc != 0:
        sys.exit(f"helper.py: {' '.join(args.command)} exited {rc}")
    out = {"seconds": elapsed}
    if before:
        out.update(deltas(before, snapshot(args.pid)))
    print(json.dumps(out))


def cmd_time(args):
    """Runs a command (stdout discarded) and prints its wall time in seconds."""
    started = time.perf_counter()
    rc = subprocess.call(args.command, stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - started
    if rc != 0:
        sys.exit(f"helper.py: {' '.join(args.command)} exited {rc}")
    print(f"{elapsed:.6f}")


def cmd_get_time(args):
    """Times one GET (no token) and prints {"seconds": ..., "status": ..., "bytes": ...}."""
    started = time.perf_counter()
    status, body = http("GET", args.url, timeout=300)
    print(json.dumps({"seconds": time.perf_counter() - started, "status": status,
                      "bytes": len(body)}))


def cmd_record(args):
    append(args.results, kv_pairs(args.fields))


def cmd_count(args):
    print(len(json.load(sys.stdin)))


def cmd_field(args):
    value = json.load(sys.stdin)
    for key in args.path:
        value = value[int(key)] if isinstance(value, list) else value[key]
    print(value if not isinstance(value, (dict, list)) else json.dumps(value))


# ----- the report --------------------------------------------------------------------------


def parse_rate(text):
    """A `--max-bandwidth` value in bytes per second (K, M, G, T are powers of 1024)."""
    text = text.strip().removesuffix("/s")
    shift = {"K": 10, "M": 20, "G": 30, "T": 40}.get(text[-1:].upper(), 0)
    return int(text[:-1] if shift else text) << shift


def mark(ok):
    return {True: "✔", False: "✘"}.get(ok, "ℹ")


def med(values):
    return statistics.median(values) if values else None


def fmt(x, digits=2):
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return f"{x:,}"


def span(values, digits=2):
    if len(values) < 2:
        return ""
    return f" (runs: {', '.join(fmt(v, digits) for v in values)})"


def cpu_us(r):
    return (r["srv_user_s"] + r["srv_sys_s"]) / max(r["requests"], 1) * 1e6


def cpu_split(r):
    n = max(r["requests"], 1)
    return (f"{cpu_us(r):.1f} µs/request (user {r['srv_user_s'] / n * 1e6:.1f}, "
            f"sys {r['srv_sys_s'] / n * 1e6:.1f})")


class Report:
    def __init__(self, results, meta):
        self.results = results
        self.meta = meta
        self.rows = []
        self.details = []
        self.whys = []

    def find(self, **match):
        return [r for r in self.results if all(r.get(k) == v for k, v in match.items())]

    def by_rep(self, **match):
        return {r["rep"]: r for r in self.find(**match)}

    def row(self, pid, what, figure, goal, met, why=None):
        verdict = "not judged" if met is None else ("**met**" if met else "**missed**")
        self.rows.append(f"| {pid} | {what} | {figure} | {goal} | {verdict} |")
        if met is False and why:
            self.whys.append(f"- **{pid}**: {why}")

    def wrk_table(self, title, records):
        lines = [f"**{title}**", "",
                 "| run | rep | req/s | p50 ms | p99 ms | non-2xx | socket errors | server CPU/request | machine busy | server counted |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for r in records:
            errors = r["connect_errors"] + r["read_errors"] + r["write_errors"] + r["timeouts"]
            counted = ", ".join(f"{k}: {v:,}" for k, v in r.get("server_counted", {}).items())
            lines.append(
                f"| {r['variant']} | {r['rep']} | {r['rps']:,.0f} | {r['lat_p50_us'] / 1000:.3f} | "
                f"{r['lat_p99_us'] / 1000:.3f} | {r['non2xx']:,} | {errors} | {cpu_split(r)} | "
                f"{r['mach_busy_frac'] * 100:.0f}% of {r['ncpu']} CPUs | {counted or 'n/a'} |")
        return "\n".join(lines) + "\n"

    def ratio_pairs(self, pid, num_variant, den_variant, value):
        nums = self.by_rep(kind="wrk", id=pid, variant=num_variant)
        dens = self.by_rep(kind="wrk", id=pid, variant=den_variant)
        reps = sorted(set(nums) & set(dens))
        return reps, nums, dens, [value(nums[k]) / value(dens[k]) for k in reps]

    def checks_for(self, pid):
        return [c for c in self.find(kind="check") if c.get("id") == pid]

    @staticmethod
    def socket_errors(r):
        return r["connect_errors"] + r["read_errors"] + r["write_errors"] + r["timeouts"]

    def invalid(self, records, expect):
        """Why a set of wrk runs does not measure what it should, or None.
        expect: "2xx" (every answer 2xx) or "401" (every answer a 401)."""
        problems = []
        for r in records:
            name = f"{r['variant']} rep {r['rep']}"
            if self.socket_errors(r):
                problems.append(f"{name}: {self.socket_errors(r)} socket errors")
            if expect == "2xx" and r["non2xx"]:
                problems.append(f"{name}: {r['non2xx']:,} answers were not 2xx")
            if expect == "401":
                counted = sum(v for k, v in r.get("server_counted", {}).items() if k.endswith(" 401"))
                if r["non2xx"] != r["requests"] or counted < r["requests"]:
                    problems.append(f"{name}: {r['non2xx']:,} non-2xx of {r['requests']:,} "
                                    f"answers, the server counted {counted:,} 401s")
        return "; ".join(problems) or None

    def p1_p2(self, pid, what, num, den, goal, diag=None):
        reps, nums, dens, ratios = self.ratio_pairs(pid, num, den, lambda r: r["rps"])
        if not ratios:
            self.row(pid, what, "not measured", f"≥ {goal}", None)
            return
        ratio = med(ratios)
        diags = self.by_rep(kind="wrk", id=pid, variant=diag) if diag else {}
        records = sorted(list(nums.values()) + list(dens.values()) + list(diags.values()),
                         key=lambda r: (r["rep"], r.get("order", 0)))
        n_num = med([nums[k]["rps"] for k in reps])
        n_den = med([dens[k]["rps"] for k in reps])
        figure = (f"{ratio:.3f}{span(ratios, 3)}; {fmt(n_num, 0)} vs {fmt(n_den, 0)} req/s")
        bad = self.invalid([nums[k] for k in reps], "401" if pid == "P2" else "2xx") or \
            self.invalid([dens[k] for k in reps], "2xx")
        cpu_num = med([cpu_us(nums[k]) for k in reps])
        cpu_den = med([cpu_us(dens[k]) for k in reps])
        why = (f"`{num}` costs {cpu_num:.1f} µs of server CPU per request against {cpu_den:.1f} µs "
               f"for `{den}` (medians; user/sys split in the details)")
        if diags:
            cpu_diag = med([cpu_us(r) for r in diags.values()])
            rps_diag = med([r["rps"] for r in diags.values()])
            jobs = self.meta["sizes"].get("jobs of the P1 tenant", 10)
            auth = (f"authentication adds {cpu_diag - cpu_den:.1f} µs" if cpu_diag > cpu_den
                    else "authentication costs nothing measurable beyond `/healthz`")
            why += (f"; `{diag}` (authenticated, lists nothing) costs {cpu_diag:.1f} µs and "
                    f"serves {fmt(rps_diag, 0)} req/s ({rps_diag / n_den:.3f} of `{den}`): "
                    f"{auth}, while reading and encoding the {jobs} jobs costs "
                    f"{max(cpu_num - cpu_diag, 0):.1f} µs (≈ {max(cpu_num - cpu_diag, 0) / jobs:.1f} µs "
                    f"per listed job)")
        r0 = nums[reps[0]]
        why += (f". The machine was {r0['mach_busy_frac'] * 100:.0f}% busy over its {r0['ncpu']} "
                f"CPUs, which wrk shares, so throughput follows the CPU cost per request. Median "
                f"p50 latency {med([nums[k]['lat_p50_us'] for k in reps]) / 1000:.3f} ms against "
                f"{med([dens[k]['lat_p50_us'] for k in reps]) / 1000:.3f} ms.")
        if bad:
            figure += f" — **invalid run**: {bad}"
        self.row(pid, what, figure, f"≥ {goal}", None if bad else ratio >= goal, why)
        title = f"{num} ÷ {den}, side by side, alternating which runs first"
        if diags:
            title += f"; `{diag}` is a diagnostic, not part of the ratio"
        self.details.append(f"### {pid}: {what}\n\n" + self.wrk_table(title, records))
        if pid == "P1":
            self.details.append(
                f"`{num}` answers from the job-list cache (the encoded body is kept until a job "
                f"changes), while `{den}` checks every region's store (a stat and an access(2) of "
                f"its directory) at each call: median server CPU {cpu_num:.1f} µs against "
                f"{cpu_den:.1f} µs per request, which is why the ratio can exceed 1.\n")

    def p3(self):
        reps, nums, dens, ratios = self.ratio_pairs(
            "P3", "big-store", "empty-store", lambda r: r["lat_p50_us"])
        if not ratios:
            self.row("P3", "list scaling", "not measured", "≤ 1.5", None)
            return
        ratio = med(ratios)
        other = self.meta["sizes"]["other_jobs"]
        figure = (f"{ratio:.3f}{span(ratios, 3)}; p50 "
                  f"{med([nums[k]['lat_p50_us'] for k in reps]) / 1000:.3f} ms vs "
                  f"{med([dens[k]['lat_p50_us'] for k in reps]) / 1000:.3f} ms")
        why = (f"with {other:,} other jobs the server spends {cpu_split(nums[reps[0]])} "
               f"against {cpu_split(dens[reps[0]])} without them (first pair).")
        bad = self.invalid(list(nums.values()) + list(dens.values()), "2xx")
        if bad:
            figure += f" — **invalid run**: {bad}"
        self.row("P3", f"list scaling (100 jobs; {other:,} other jobs)", figure, "≤ 1.5",
                 None if bad else ratio <= 1.5, why)
        records = sorted(list(nums.values()) + list(dens.values()),
                         key=lambda r: (r["rep"], r.get("order", 0)))
        self.details.append("### P3: list scaling\n\n" + self.wrk_table(
            "one connection, sequential requests; big-store ÷ empty-store", records))

    def p4(self):
        runs = sorted(self.find(kind="wrk", id="P4"), key=lambda r: r["rep"])
        if not runs:
            self.row("P4", "durable creates", "not measured", "≥ 1,000/s", None)
            return
        rates = [r["rps"] for r in runs]
        bad = self.invalid(runs, "2xx")
        durable = [c for c in self.checks_for("P4") if c["ok"] is False]
        if durable:
            bad = "; ".join(filter(None, [bad, durable[0]["detail"]]))
        rate = med(rates)
        r0 = runs[0]
        wb = r0.get("io_write_bytes")
        why = (f"{cpu_split(r0)} of server CPU; the machine was {r0['mach_busy_frac'] * 100:.0f}% "
               f"busy and {r0['mach_iowait_frac'] * 100:.0f}% in I/O wait; p50 latency "
               f"{r0['lat_p50_us'] / 1000:.2f} ms, p99 {r0['lat_p99_us'] / 1000:.2f} ms"
               + (f"; the server wrote {wb / max(r0['requests'], 1) / 1024:.1f} KiB to storage per created job"
                  if wb is not None else "") + " (first run).")
        figure = f"{fmt(rate, 0)}/s{span(rates, 0)}"
        if bad:
            figure += f" — **invalid run**: {bad}"
        self.row("P4", f"durable creates, {r0.get('connections', '?')} clients",
                 figure, "≥ 1,000/s", None if bad else rate >= 1000, why)
        text = self.wrk_table(
            f"POST /jobs, {r0.get('connections', '?')} connections, server with --no-worker", runs)
        for r in runs:
            if r.get("io_write_bytes") is not None:
                text += (f"\nRep {r['rep']}: the server wrote {r['io_write_bytes'] / max(r['requests'], 1) / 1024:.1f}"
                         f" KiB to storage per created job; the machine was "
                         f"{r['mach_iowait_frac'] * 100:.0f}% in I/O wait.\n")
        for c in self.checks_for("P4"):
            text += f"\n{mark(c['ok'])} {c['detail']}\n"
        self.details.append("### P4: durable creates\n\n" + text)

    def copies(self, pid):
        return sorted(self.find(kind="copy", id=pid), key=lambda r: (r["rep"], r["order"]))

    def copy_table(self, pid, title):
        lines = [f"**{title}**", "", "| rep | tool | seconds | note |", "|---|---|---|---|"]
        for r in self.copies(pid):
            note = []
            if "alloc_kib" in r:
                note.append(f"destination allocates {r['alloc_kib'] / 1024:,.1f} MiB")
            if r.get("srv_user_s") is not None:
                note.append(f"server CPU user {r['srv_user_s']:.2f} s, sys {r['srv_sys_s']:.2f} s, "
                            f"{r.get('polls', 0)} polls")
            if r.get("srv_minflt") is not None:
                note.append(f"{r['srv_minflt']:,} page faults (minor) in the server")
            lines.append(f"| {r['rep']} | {r['tool']} | {r['seconds']:.3f} | {'; '.join(note)} |")
        return "\n".join(lines) + "\n"

    def tool_by_rep(self, pid, tool):
        return {r["rep"]: r["seconds"] for r in self.copies(pid) if r["tool"] == tool}

    def malloc_note(self, pid, data_bytes):
        """What the page faults of our copies and the malloc diagnostic say, as a sentence."""
        ours = [r for r in self.copies(pid) if r["tool"] == "api" and "srv_minflt" in r]
        kept = [r for r in self.copies(pid) if r["tool"] == "api-keep-freed"]
        if not ours:
            return ""
        faults = med([r["srv_minflt"] for r in ours])
        text = (f" Our copies took a median {faults:,.0f} minor page faults in the server "
                f"({faults / max(data_bytes / MIB, 1):,.0f} per MiB of data; 256 per MiB is a "
                "fresh 4 KiB page for every 4 KiB copied)")
        if kept:
            t_ours = med([r["seconds"] for r in ours])
            t_kept = med([r["seconds"] for r in kept])
            f_kept = med([r.get("srv_minflt", 0) for r in kept])
            text += (f"; the diagnostic runs `api-keep-freed` (the same copy with glibc's malloc "
                     "keeping what it frees, `GLIBC_TUNABLES` in the Commands; run after the "
                     f"others, not interleaved) take {t_kept:.3f} s against {t_ours:.3f} s, with "
                     f"{f_kept:,.0f} page faults")
            # Only when buffers came back as fresh pages (copy.rs reuses them since dd5a270).
            if f_kept < faults / 4 and faults / max(data_bytes / MIB, 1) >= 64:
                text += (": the chunk buffers (1 MiB each, allocated and zeroed afresh for "
                         "every chunk) come back from the kernel as new pages when malloc "
                         "gives their memory back between chunks, and these faults cost "
                         f"{max(t_ours - t_kept, 0):.3f} s of the copy")
        return text + "."

    def p5(self):
        size = self.meta["sizes"]["copy_bytes"]
        api = self.tool_by_rep("P5", "api")
        cp = self.tool_by_rep("P5", "cp")
        b3 = self.tool_by_rep("P5", "b3sum")
        sha = self.tool_by_rep("P5", "sha512sum")
        cpf = self.tool_by_rep("P5", "cp+fsync")
        md5 = self.tool_by_rep("P5", "md5sum")
        what = f"dir → dir copy with verification ({size / MIB:,.0f} MiB): ours ÷ max(cp, b3sum)"
        reps = sorted(set(api) & set(cp) & set(b3))
        if not set(api) & set(cp):
            self.row("P5", what, "not measured", "≤ 1.2", None)
            return

        def ratios(den):
            ks = sorted(set(api) & set(den))
            return [api[k] / den[k] for k in ks]

        def ratios_max(a, b):
            ks = sorted(set(api) & set(a) & set(b))
            return [api[k] / max(a[k], b[k]) for k in ks]

        def m(d):
            return med(list(d.values())) if d else None

        parts = []
        if reps:
            rs = ratios_max(cp, b3)
            ratio = med(rs)
            parts.append(f"{ratio:.3f}{span(rs, 3)}; ours {m(api):.2f} s, cp {m(cp):.2f} s, "
                         f"b3sum {m(b3):.2f} s")
        else:
            ratio = None
            parts.append(f"n/a (no b3sum); ours {m(api):.2f} s, cp {m(cp):.2f} s")
        also = []
        if sha:
            rs = ratios_max(cp, sha)
            also.append(f"÷ max(cp, sha512sum {m(sha):.2f} s) {med(rs):.3f} (the old P5)")
        if cpf:
            also.append(f"÷ cp+fsync ({m(cpf):.2f} s) {med(ratios(cpf)):.3f}")
            if b3:
                also.append(f"÷ max(cp+fsync, b3sum) {med(ratios_max(cpf, b3)):.3f}")
        if also:
            parts.append("ours " + ", ".join(also))
        figure = "; ".join(parts)
        first = next((r for r in self.copies("P5") if r["tool"] == "api"), {})
        cpu = first.get("srv_user_s", 0) + first.get("srv_sys_s", 0)
        floor = ""
        if cpf and b3 and m(cpf) > 1.2 * max(m(cp), m(b3)):
            floor = (f": cp+fsync alone ({m(cpf):.2f} s, {m(cpf) / m(cp):.2f}× cp) is above the "
                     f"goal's {1.2 * max(m(cp), m(b3)):.2f} s, so no copy that is durable before "
                     "`replicated` can meet it on this machine")
        elif cpf:
            floor = f": cp+fsync ({m(cpf):.2f} s) is the floor of a durable copy"
        why = ("ours reads the source's chunks, writes them, checks each chunk's BLAKE3 against the "
               "source's manifest on a second thread, makes what it wrote durable about once a "
               "second (`fdatasync`) and at the end, and stores the destination's manifest; "
               "`cp` and `b3sum` leave their work in the page cache" + floor
               + (f"; `md5sum` {m(md5):.2f} s for comparison" if md5 else "") + "."
               + self.malloc_note("P5", size)
               + f" During our first copy the server used user {first.get('srv_user_s', 0):.2f} s + "
               f"sys {first.get('srv_sys_s', 0):.2f} s of CPU in {first.get('seconds', 0):.2f} s "
               f"({cpu / max(first.get('seconds', 1), 1e-9):.2f} CPUs on average), the machine was "
               f"{first.get('mach_busy_frac', 0) * 100:.0f}% busy over {first.get('ncpu', '?')} CPUs "
               f"and {first.get('mach_iowait_frac', 0) * 100:.0f}% in I/O wait.")
        self.row("P5", what, figure, "≤ 1.2", None if ratio is None else ratio <= 1.2, why)
        self.details.append("### P5: copy with verification\n\n" + self.copy_table(
            "P5", "page cache warm; a `sync` (untimed) before each timed step; order rotates per rep")
            + "\n`b3sum` is the BLAKE3 team's CLI (it maps the file and hashes on every CPU); "
            "`cp+fsync` is `cp` then `sync` of the copy, as our copy makes its file durable "
            "before `replicated`.\n")

    def g1(self):
        runs = self.find(kind="glance")
        if not runs:
            return
        r = runs[-1]
        mib = r["bytes"] / MIB
        what = f"Glance → Glance copy ({mib:,.0f} MiB qcow2, two Glances)"
        ratio = r["median_ratio"]
        figure = (f"{ratio:.3f}{span(r['ratios'], 3)}; ours {med(r['ours_s']):.2f} s, "
                  f"`curl GET \\| curl -T - PUT` {med(r['curl_s']):.2f} s")
        self.row("G1", what, figure, "≤ 1.1", ratio <= 1.1,
                 "see the G1 details for where the time goes")
        lines = ["### G1: Glance → Glance", "",
                 "Two no-auth Glance 33.0.0 services (gunicorn, one worker, one thread each) from "
                 "`tests/openstack/lab.py`; ours is `POST /jobs` until `GET` shows `replicated` "
                 "(polled every 20 ms), the other side a `curl` download piped into a `curl` "
                 "chunked upload into an image record made beforehand; order alternates per rep.",
                 "", "| rep | ours s | curl pipe s | ratio | server CPU s |", "|---|---|---|---|---|"]
        cpu = r.get("server_cpu_s", [])
        for i, (o, c) in enumerate(zip(r["ours_s"], r["curl_s"])):
            lines.append(f"| {i + 1} | {o:.2f} | {c:.2f} | {o / c:.3f} | "
                         f"{cpu[i] if i < len(cpu) else float('nan'):.2f} |")
        self.details.append("\n".join(lines) + "\n")

    def p6(self):
        s = self.meta["sizes"]
        api = self.tool_by_rep("P6", "api")
        cp = self.tool_by_rep("P6", "cp --sparse=always")
        cpf = self.tool_by_rep("P6", "cp --sparse=always+fsync")
        sha = self.tool_by_rep("P6", "sha512sum")
        md5 = self.tool_by_rep("P6", "md5sum")
        imp = self.tool_by_rep("P6", "import")
        reps = sorted(set(api) & set(cp))
        what = (f"sparse copy ({s['sparse_bytes'] / MIB:,.0f} MiB raw, "
                f"{s['sparse_data_bytes'] / MIB:,.0f} MiB data): ours ÷ cp --sparse=always")

        def m(d):
            return med(list(d.values())) if d else None

        if not reps:
            self.row("P6", what, "not measured", "≤ 1.5", None)
        else:
            ratios = [api[k] / cp[k] for k in reps]
            ratio = med(ratios)
            figure = (f"{ratio:.2f}{span(ratios, 2)}; ours {m(api):.3f} s, cp {m(cp):.3f} s")
            if cpf:
                ks = sorted(set(api) & set(cpf))
                figure += (f"; ours ÷ cp --sparse=always+fsync ({m(cpf):.3f} s) "
                           f"{med([api[k] / cpf[k] for k in ks]):.2f}")
            first = next((r for r in self.copies("P6") if r["tool"] == "api"), {})
            why = ("ours reads only the chunks that hold data (`SEEK_DATA`; the manifest's holes "
                   "are not read), checks their BLAKE3 against the source's manifest, makes the "
                   "file durable before `replicated` and stores the destination's manifest, "
                   "while `cp --sparse=always` writes into the page cache and returns"
                   + (f"; with a `sync` of its copy it takes {m(cpf):.3f} s"
                      + (f", above the goal's {1.5 * m(cp):.3f} s, so no copy that is durable "
                         "before `replicated` can meet it on this machine"
                         if m(cpf) > 1.5 * m(cp) else "") if cpf else "")
                   + f". A fixed part of ours does not depend on the size: the POST, the "
                   f"worker taking the job, creating the destination record, the final "
                   f"transaction, and the polling (every {s.get('poll_seconds', 0.05) * 1000:.0f} ms). "
                   f"During our first copy the server used user {first.get('srv_user_s', 0):.2f} s "
                   f"+ sys {first.get('srv_sys_s', 0):.2f} s of CPU and polled {first.get('polls', 0)} "
                   "times." + self.malloc_note("P6", s["sparse_data_bytes"]))
            self.row("P6", what, figure, "≤ 1.5", ratio <= 1.5, why)
        if imp:
            dig = {k: max(sha[k], md5[k]) for k in sorted(set(imp) & set(sha) & set(md5))}
            figure = f"import {m(imp):.2f} s{span(list(imp.values()), 2)}"
            if sha:
                figure += f", sha512sum {m(sha):.2f} s"
            if md5:
                figure += f", md5sum {m(md5):.2f} s"
            if dig:
                rs = [imp[k] / dig[k] for k in dig]
                figure += f"; import ÷ max(sha512sum, md5sum) {med(rs):.2f}{span(rs, 2)}"
            first = next((r for r in self.copies("P6") if r["tool"] == "import"), {})
            if first.get("srv_user_s") is not None:
                figure += (f"; server CPU user {first['srv_user_s']:.2f} s + sys "
                           f"{first['srv_sys_s']:.2f} s (first import)")
            self.row("P6 import", f"`image import` of the same sparse file (through the running "
                     "server)", figure,
                     "nothing but SHA-512 and MD5 costs more than the data (no number)", None)
        self.details.append("### P6: sparse copy\n\n" + self.copy_table(
            "P6", "page cache warm; destination allocation shows holes stayed holes")
            + "\n`import` is `image-replicator image import` of the region's file into a new "
            "image of the same region (the server reads it: the CLI goes through its admin "
            "socket), deleted again after each rep; SHA-512 and MD5 have no shortcut for zeros, "
            "so an import reads and hashes the holes too, SHA-512 and MD5 on threads of their "
            "own.\n")

    def r1(self):
        runs = sorted(self.find(kind="resume", id="R1"), key=lambda r: r["rep"])
        if not runs:
            return
        size = runs[0]["bytes"]
        cap_text = runs[0]["cap"]
        cap = parse_rate(cap_text)
        budget = 0.3 * size / cap
        what = (f"resume after SIGKILL at ≥ {runs[0]['kill_percent']} % of a {size / MIB:,.0f} MiB "
                f"dir → dir copy under `serve --max-bandwidth {cap_text}`")
        secs, after_reads, job_reads, rows = [], [], [], []
        for r in runs:
            b, a, w, k = r["before"], r["after"], r["wait"], r["kill"]
            counted = w.get("counters", {}).get("image_replicator_source_read_bytes_total")
            diff = a["source_bytes_read"] - b["source_bytes_read"]
            # What the restart charges to the killed attempt: its writes past its last
            # checkpoint, plus a chunk it may have been reading (Job::begin_attempt).
            estimate = max(r["part_bytes_after_kill"] - b["bytes_verified"], 0) + MIB
            secs.append(w["seconds"])
            job_reads.append(diff)
            after_reads.append(counted if counted is not None else diff)
            rows.append(
                f"| {r['rep']} | {k['part_percent']:.1f} % ({k['part_bytes'] / MIB:,.0f} MiB, "
                f"{k['seconds_to_kill']:.2f} s after the POST) | {b['copy_progress']} % / "
                f"{b['bytes_verified'] / MIB:,.0f} MiB / {b['source_bytes_read'] / MIB:,.0f} MiB | "
                f"{w['seconds']:.2f} | "
                + (f"{counted / MIB:,.1f} MiB ({counted / size * 100:.1f} %)" if counted is not None
                   else "n/a")
                + f" | {diff / MIB:,.1f} MiB ({diff / size * 100:.1f} %; of it "
                f"{estimate / MIB:,.1f} MiB charged to the killed attempt) | "
                f"{a['resumes']} | {a['source_bytes_read'] / MIB:,.1f} MiB ({a['source_bytes_read'] / size:.2f}×) |")
        t = med(secs)
        reads = med(after_reads)
        kill_at = med([r["kill"]["part_percent"] for r in runs])
        figure = (f"restart → replicated {t:.2f} s{span(secs, 2)} = {t / (size / cap):.3f} × size ÷ "
                  f"cap; read from the source after the restart {reads / MIB:,.1f} MiB = "
                  f"{reads / size * 100:.1f} % of the image (killed at {kill_at:.1f} %)")
        met = t <= budget and reads <= 0.2 * size
        why = (f"the goal is ≤ {budget:.2f} s (0.3 × {size / MIB:,.0f} MiB ÷ {cap_text}/s) and "
               f"≤ {0.2 * size / MIB:,.0f} MiB read after the restart; see the R1 details")
        self.row("R1", what, figure, "≤ 0.3 × size ÷ cap; ≤ 20 % read after the restart", met,
                 why)
        lines = [
            "### R1: resume after SIGKILL", "",
            f"`serve --max-bandwidth {cap_text}` copies a {size / MIB:,.0f} MiB image between two "
            "directory regions (store C, page cache warm); the benchmark watches the "
            "destination's partial file (`.ID.part`) every 10 ms and sends SIGKILL to the server "
            f"the moment it holds {runs[0]['kill_percent']} % of the image, reads the job with "
            "`image-replicator --json job show` while no server runs, restarts the server with "
            "the same cap and polls `GET` of the job until `replicated`; the time runs from the "
            "restart (before the process starts). Bytes read after the restart are the "
            "restarted server's `image_replicator_source_read_bytes_total` (this process's "
            "source reads); the job's `source_bytes_read` after minus before is also shown: it "
            "adds what the restart charges to the killed attempt for its reads past its last "
            "checkpoint (what the partial file held beyond `bytes_verified`, plus one chunk), "
            "so it is an upper bound. Reading the destination's own prefix to check it counts "
            "in neither.", "",
            "| rep | killed at (partial file) | job at the kill: copy_progress / bytes_verified / "
            "source_bytes_read | restart → replicated s | read from the source after the restart "
            "(server counter) | job's source_bytes_read after − before | resumes | "
            "source_bytes_read in all |",
            "|---|---|---|---|---|---|---|---|"] + rows
        self.details.append("\n".join(lines) + "\n")

    def p7(self):
        rss = {r["name"]: r for r in self.find(kind="rss")}
        size = self.meta["sizes"]["copy_bytes"]
        peak = rss.get("copy_peak")
        idle = rss.get("idle")
        flood = [r["rss_max_kib"] for r in self.find(kind="wrk", id="P2", variant="/jobs random token")
                 if r.get("rss_max_kib")]
        flood_max = max(flood) if flood else None
        figs, oks = [], []
        big = rss.get("idle_http_big")
        for label, kib, limit, note in (
                ("peak while copying", peak and peak["kib"], 64, ""),
                ("idle", idle and idle["kib"], 20,
                 f" ({big['kib'] / 1024:.1f} MiB idle on the store with "
                 f"{self.meta['sizes']['other_jobs']:,} other jobs)" if big else ""),
                ("P2 flood", flood_max, 64, "")):
            if kib is None:
                figs.append(f"{label} n/a")
                continue
            figs.append(f"{label} {kib / 1024:.1f} MiB{note}")
            oks.append(kib / 1024 < limit)
        met = all(oks) if oks else None
        notes = []
        if "idle_before_copy_hwm" in rss:
            notes.append(f"VmHWM before the copy (start-up peak) "
                         f"{rss['idle_before_copy_hwm']['kib'] / 1024:.1f} MiB")
        for name, label in (("idle_http", "idle RSS of the HTTP server (small store)"),
                            ("idle_http_big", f"idle RSS with {self.meta['sizes']['other_jobs']:,} other jobs")):
            if name in rss:
                notes.append(f"{label} {rss[name]['kib'] / 1024:.1f} MiB")
        why = "; ".join(notes) + "." if notes else None
        self.row("P7", f"memory (copy of {size / MIB:,.0f} MiB; idle; P2 flood)", "; ".join(figs),
                 "< 64 MiB; < 20 MiB; < 64 MiB", met, why)
        lines = ["### P7: memory", "", "| what | KiB | how |", "|---|---|---|"]
        for name, r in rss.items():
            lines.append(f"| {name} | {r['kib']:,} | {r.get('how', '')} |")
        for r in self.find(kind="wrk", id="P2", variant="/jobs random token"):
            lines.append(f"| P2 flood, rep {r['rep']} | {r.get('rss_max_kib') or 0:,} | max of "
                         f"{r.get('rss_samples', 0)} VmRSS samples, every 100 ms |")
        self.details.append("\n".join(lines) + "\n")

    def render(self, compared=False):
        m = self.meta
        self.p1_p2("P1", "cost of authentication", "/jobs", "/healthz", 0.85, "/jobs?limit=0")
        self.p1_p2("P2", "garbage-token flood", "/jobs random token", "/healthz random token", 0.85)
        self.p3()
        self.p4()
        self.p5()
        self.p6()
        self.r1()
        self.p7()
        self.g1()
        out = ["# Benchmarks", ""]
        if m["mode"] == "quick":
            out += ["> **Quick mode**: tiny sizes and short runs, to check that the benchmark "
                    "works. These figures are not comparable with the goals.", ""]
        out += [f"Measured {m['started']} to {m['finished']} with `{m['command']}` on commit "
                f"`{m['commit']}`. Ratios are measured side by side in one run: each pair runs "
                f"back to back, {m['reps']} time(s), alternating which side goes first, and the "
                "table shows the median of the per-pair ratios.", "",
                f"The machine ({m['machine'].get('CPUs (nproc)', '?')} CPUs) is shared with other "
                "developers' builds and tests, which the benchmark cannot stop: the load averages "
                "under Machine show how busy it was, and the figures carry that noise."]
        if compared:
            out += ["", "The last section, \"Side by side\", comes from an earlier run of "
                    "`scripts/bench.sh --compare` (its heading names the two commits, its table "
                    "the machine); its figures are not comparable with these."]
        out += [""]
        s = m["sizes"]
        out += ["## Method", "",
                f"- HTTP figures (P1-P4) come from `wrk` ({s['wrk threads']} threads, "
                f"{s['wrk seconds per run']} s a run, after an untimed warm-up) against "
                "`image-replicator serve --no-worker` on 127.0.0.1, with its default log level "
                "(one log line per request, to a file). wrk runs on the same machine.",
                "- P1 sends the same `X-Auth-Token` header to `/healthz` and to `/jobs`; P2 uses the "
                "same random-token script for both sides, so the client does the same work on "
                "both sides of a ratio.",
                "- P3 uses one connection (sequential requests) and wrk's median latency; the two "
                "stores are set up by the same commands, the big one also holds the other tenant's "
                "jobs (seeded first, with `job seed`).",
                "- P4 counts answers 202 per second; afterwards the server is killed with SIGKILL "
                "and the store must still hold every job it answered 202 for.",
                "- P5/P6 time from the POST until `GET` of the job shows `replicated` (polled "
                f"every {s.get('poll_seconds', 0.05) * 1000:.0f} ms) against `cp`, `cp` + `sync`, "
                "`b3sum`, `sha512sum` and `md5sum` of the same source file, page cache warm (the "
                "file is read once before each rep), `sync` (untimed) before each step; P6 also "
                "times `image import` of its file.",
                f"- R1 kills a copy of {s.get('r1_bytes', 0) / MIB:,.0f} MiB under "
                f"`serve --max-bandwidth {s.get('r1_cap', '?')}` with SIGKILL and times the "
                "restart until `replicated`; the server's `/metrics` and `job show --json` give "
                "the bytes read.",
                "- Server CPU comes from /proc/PID/stat (utime, stime), machine CPU from /proc/stat, "
                "memory from VmRSS/VmHWM in /proc/PID/status, status counts from the server's "
                "`/metrics` (\"server counted\").", ""]
        out += ["## Machine", "", "| | |", "|---|---|"]
        for key, value in m["machine"].items():
            out.append(f"| {key} | {value} |")
        out += ["", "## Results", "", "| id | what | figure | goal | result |", "|---|---|---|---|---|"]
        out += self.rows
        out += [""]
        if self.whys:
            out += ["## Why the misses", ""] + self.whys + [""]
        checks = [c for c in self.find(kind="check") if c.get("id") != "P4"]
        if checks:
            out += ["## Checks", ""]
            out += [f"- {mark(c['ok'])} {c['detail']}" for c in checks]
            out += [""]
        out += ["## Details", ""] + self.details
        out += ["## Commands", "",
                f"To reproduce: `{m['command']}` from the repository's root (it builds the "
                "release binary unless `--no-build`; `--no-glance` skips G1, `--quick` runs "
                "tiny sizes to check that the benchmark works).", "",
                "Sizes: " + ", ".join(f"{k} = {v:,}" if isinstance(v, int) else f"{k} = {v}"
                                      for k, v in m["sizes"].items()) + ".", "",
                "Set-up and checks, in order (`image-replicator` is `target/release/image-replicator`; "
                "A and B are the HTTP stores, C the copy store):", "",
                "```sh"] + m["setup_commands"] + ["```", "",
                "Load, copies and R1 (`$PORT_*` are the servers' ports, `$TOKEN_*` their tokens, "
                "`$API` the jobs URL of the copy server, `$DIR_C` store C, `$REGION_OT1` the "
                "directory of region ot1 in store C):", "",
                "```sh"]
        seen = []
        for r in self.results:
            cmd = r.get("cmd")
            if cmd and cmd not in seen:
                seen.append(cmd)
        out += seen + ["```", ""]
        return "\n".join(out)


def cmd_report(args):
    results = [json.loads(l) for l in open(args.results, encoding="utf-8") if l.strip()]
    meta = json.load(open(args.meta, encoding="utf-8"))
    # A comparison section (scripts/bench.sh --compare) of an earlier run is kept at the end.
    kept = None
    if os.path.exists(args.out):
        kept = compare_block(open(args.out, encoding="utf-8").read())
    text = Report(results, meta).render(compared=kept is not None)
    # The chunk size of manifests is measured by scripts/chunk-size.sh, not by this run: its
    # section is carried along from scripts/bench/chunk-size.md.
    chunk = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chunk-size.md")
    if os.path.exists(chunk):
        text = text.rstrip("\n") + "\n\n" + open(chunk, encoding="utf-8").read()
    # So are the peer figures (D1-D4), from the last `scripts/bench.sh --only D`.
    peer = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer.md")
    if os.path.exists(peer):
        text = text.rstrip("\n") + "\n\n" + open(peer, encoding="utf-8").read()
    if kept:
        text = text.rstrip("\n") + "\n\n" + kept
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)


# ----- the comparison report (scripts/bench.sh --compare) ----------------------------------

COMPARE_START = "<!-- scripts/bench.sh --compare: start -->"
COMPARE_END = "<!-- scripts/bench.sh --compare: end -->"
NOISE = 0.10


def put_section(path, start, end, block):
    """Writes block (which begins with the marker start and ends with end) into the Markdown
    file path: in place of the text between those markers, else before the side-by-side
    comparison (kept last), else at the end; the rest of the file is kept."""
    old = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    at, stop = old.find(start), old.find(end)
    if at >= 0 and stop > at:
        text = old[:at] + block.rstrip("\n") + old[stop + len(end):]
    elif COMPARE_START in old:
        at = old.find(COMPARE_START)
        text = old[:at] + block.rstrip("\n") + "\n\n" + old[at:]
    elif old:
        text = old.rstrip("\n") + "\n\n" + block
    else:
        text = "# Benchmarks\n\n" + block
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)

# What changed in behaviour (not speed) between 5ef79c4 and the main of issue 12 that touches a
# figure; printed only when the base binary comes from 5ef79c4.
BEHAVIOUR_5EF79C4 = {
    "P1": "Same requests and the same bodies on both sides (10 jobs: under the new 1,000-job "
          "page, so the new main answers the reference's whole, unpaged list). The new main "
          "looks a token up by its full SHA-256 (5ef79c4: its first 4 bytes); it answers a kept "
          "`GET /jobs` page on the executor, as 5ef79c4 does, and builds a page on the blocking "
          "pool (5ef79c4: a tenant's page on the executor), so that big lists cannot hold the "
          "executor; `/healthz` runs on the pool on both sides and on the new main also checks "
          "that the store can write and who owns each region directory.",
    "P2": "Every answer is a 401 on both sides. The new main keeps its rejected tokens in the "
          "shared bounded map (`cache::Bounded`) and looks them up by the full SHA-256.",
    "P3": "100 jobs, under the 1,000-job page: the same body on both sides, kept pages "
          "answered on the executor by both, built on the executor by 5ef79c4 and on the "
          "blocking pool by the new main (see P1). 5ef79c4 would "
          "answer a tenant with more than 1,000 jobs in one unpaged list; the new main pages "
          "at 1,000 by default and at most, so a list of more than 1,000 jobs is not comparable "
          "(none is listed here).",
    "P4": "The same body, 202 on both sides: copies of a 4 KiB image, so that the new main's "
          "room check (every accepted copy promises its image's size at the destination) "
          "refuses none (with the 1 MiB image of earlier runs it answered 409 after about "
          "58,000 jobs, the free space beside the reserve). The store of each side grows by "
          "the jobs it created (its own rate), as in the single-binary run. The new main sets "
          "umask 077 and makes the store's files 0600 (5ef79c4: the umask's mode) and answers "
          "507 when the disk is full: neither shows here (one user, free space).",
    "P5": "The new main writes the destination image 0600 (5ef79c4: the umask's mode) and "
          "verifies through the `ImageStore` sink; cp and sha512sum read the same source bytes "
          "on both sides (one file imported into each side's store).",
}

FIGURES = {
    # id: (what, unit of the figure, better when, helper to compute per rep)
    "P1": ("cost of authentication: req/s of GET /jobs (10 jobs) ÷ GET /healthz", "ratio",
           "higher"),
    "P2": ("garbage-token flood: req/s of GET /jobs (random tokens, 401) ÷ GET /healthz",
           "ratio", "higher"),
    "P3": ("list scaling: p50 of GET /jobs (100 jobs) with {other_jobs:,} other jobs ÷ without",
           "ratio", "lower"),
    "P4": ("durable creates: answers 202 per second, 32 clients", "/s", "higher"),
    "P5": ("copy with verification: our copy ÷ max(cp, sha512sum)", "ratio", "lower"),
}


def side_of(r):
    if "side" in r:
        return r["side"]
    return r.get("server", "").rpartition("_")[2]


class Compare:
    def __init__(self, results, meta):
        self.results = results
        self.meta = meta
        self.single = Report(results, meta)

    def wrk(self, pid, side, variant):
        return {r["rep"]: r for r in self.results
                if r.get("kind") == "wrk" and r.get("id") == pid and r.get("variant") == variant
                and side_of(r) == side}

    def copies(self, side, tool):
        return {r["rep"]: r for r in self.results
                if r.get("kind") == "copy" and r.get("id") == "P5" and r.get("side") == side
                and r.get("tool") == tool}

    def per_rep(self, pid, side):
        """{rep: figure} for one side, the raw measurements {label: {rep: value}}, and the
        records that must be valid."""
        raw, records = {}, []
        if pid in ("P1", "P2"):
            num, den = (("/jobs", "/healthz") if pid == "P1"
                        else ("/jobs random token", "/healthz random token"))
            n, d = self.wrk(pid, side, num), self.wrk(pid, side, den)
            reps = sorted(set(n) & set(d))
            fig = {k: n[k]["rps"] / d[k]["rps"] for k in reps}
            raw[f"{num} req/s"] = {k: n[k]["rps"] for k in reps}
            raw[f"{den} req/s"] = {k: d[k]["rps"] for k in reps}
            raw[f"{num} server CPU µs/request"] = {k: cpu_us(n[k]) for k in reps}
            raw[f"{den} server CPU µs/request"] = {k: cpu_us(d[k]) for k in reps}
            bad = self.single.invalid(list(n.values()), "401" if pid == "P2" else "2xx") or \
                self.single.invalid(list(d.values()), "2xx")
        elif pid == "P3":
            n, d = self.wrk(pid, side, "big-store"), self.wrk(pid, side, "empty-store")
            reps = sorted(set(n) & set(d))
            fig = {k: n[k]["lat_p50_us"] / d[k]["lat_p50_us"] for k in reps}
            raw["big-store p50 ms"] = {k: n[k]["lat_p50_us"] / 1000 for k in reps}
            raw["empty-store p50 ms"] = {k: d[k]["lat_p50_us"] / 1000 for k in reps}
            raw["big-store server CPU µs/request"] = {k: cpu_us(n[k]) for k in reps}
            raw["empty-store server CPU µs/request"] = {k: cpu_us(d[k]) for k in reps}
            bad = self.single.invalid(list(n.values()) + list(d.values()), "2xx")
        elif pid == "P4":
            n = self.wrk(pid, side, "POST /jobs")
            fig = {k: r["rps"] for k, r in n.items()}
            raw["POST /jobs p50 ms"] = {k: r["lat_p50_us"] / 1000 for k, r in n.items()}
            raw["server CPU µs/request"] = {k: cpu_us(r) for k, r in n.items()}
            raw["server wrote KiB/job"] = {k: r["io_write_bytes"] / max(r["requests"], 1) / 1024
                                           for k, r in n.items() if "io_write_bytes" in r}
            bad = self.single.invalid(list(n.values()), "2xx")
        else:
            api, cp, sha = (self.copies(side, t) for t in ("api", "cp", "sha512sum"))
            reps = sorted(set(api) & set(cp) & set(sha))
            fig = {k: api[k]["seconds"] / max(cp[k]["seconds"], sha[k]["seconds"]) for k in reps}
            raw["our copy s"] = {k: api[k]["seconds"] for k in reps}
            raw["cp s"] = {k: cp[k]["seconds"] for k in reps}
            raw["sha512sum s"] = {k: sha[k]["seconds"] for k in reps}
            raw["server CPU s (user + sys) of our copy"] = {
                k: api[k].get("srv_user_s", 0) + api[k].get("srv_sys_s", 0) for k in reps}
            bad = None
        return fig, raw, bad

    @staticmethod
    def ratios(base, new):
        reps = sorted(set(base) & set(new))
        return reps, [new[k] / base[k] for k in reps if base[k]]

    def render(self):
        m = self.meta
        fmt_fig = {"ratio": lambda v: f"{v:.3f}", "/s": lambda v: f"{v:,.0f}/s"}
        rows, raw_rows, notes, verdicts = [], [], [], {}
        for pid in m["figures"]:
            what, unit, better = FIGURES[pid]
            what = what.format(other_jobs=m["sizes"]["other_jobs"])
            fb, rb, bad_b = self.per_rep(pid, "base")
            fn, rn, bad_n = self.per_rep(pid, "new")
            reps, rs = self.ratios(fb, fn)
            if not rs:
                rows.append(f"| {pid} | {what} | not measured | not measured | n/a | n/a |")
                continue
            ratio = med(rs)
            within = abs(ratio - 1) <= NOISE
            bad = "; ".join(f"{s}: {b}" for s, b in (("base", bad_b), ("new", bad_n)) if b)
            verdict = ("**invalid run**: " + bad) if bad else ("yes" if within else
                       ("**no, better**" if (ratio > 1) == (better == "higher") else "**no, worse**"))
            verdicts[pid] = (ratio, within, bad)
            runs = ", ".join(f"{v:.3f}" for v in rs)
            rows.append(f"| {pid} | {what} ({better} is better) | {fmt_fig[unit](med(list(fb.values())))} | "
                        f"{fmt_fig[unit](med(list(fn.values())))} | **{ratio:.3f}** ({runs}) | {verdict} |")
            for label in rb:
                r_reps, r_rs = self.ratios(rb[label], rn.get(label, {}))
                if not r_rs:
                    continue
                raw_rows.append(
                    f"| {pid} | {label} | {fmt(med(list(rb[label].values())), 3)} | "
                    f"{fmt(med(list(rn[label].values())), 3)} | {med(r_rs):.3f} "
                    f"({', '.join(f'{v:.3f}' for v in r_rs)}) |")
            if m["base"]["commit"].startswith("5ef79c4") and pid in BEHAVIOUR_5EF79C4:
                notes.append(f"- **{pid}**: {BEHAVIOUR_5EF79C4[pid]}")
        loads = m.get("load_1min_samples") or []
        load_text = (f"min {min(loads):.2f}, median {med(loads):.2f}, max {max(loads):.2f} over "
                     f"{len(loads)} samples (every 30 s)" if loads else "not sampled")
        out = [COMPARE_START, "",
               f"## Side by side: {m['new']['commit']} against {m['base']['commit']}", ""]
        if m["mode"] == "quick":
            out += ["> **Quick mode**: tiny sizes and short runs, to check that the comparison "
                    "works; not evidence of anything.", ""]
        s = m["sizes"]
        out += [
            f"Measured {m['started']} to {m['finished']} with `{m['command']}`: "
            f"{', '.join(m['figures'])} of the base binary (`{m['base']['binary']}`, built from "
            f"`{m['base']['commit']}`) and the new one (`{m['new']['binary']}`, built from "
            f"`{m['new']['commit']}`), in one run, with the sizes and methods of the "
            "single-binary figures below (wrk "
            f"{s['wrk threads']} threads, {s['wrk seconds per run']} s a run, "
            f"{s['wrk connections (P1, P2, P4)']} connections for P1, P2 and P4; "
            f"{s['other_jobs']:,} other jobs for P3; a {s['copy_bytes'] / MIB:,.0f} MiB copy "
            "for P5). Each side has its own data directories, made by its own CLI with the same "
            "commands; all servers of both sides run during the HTTP figures. For every figure "
            "each rep runs one unit per side (P1-P3: both requests of the ratio; P4: one POST "
            "run; P5: our copy, cp and sha512sum), the two units back to back, base first in odd "
            f"reps and new first in even ones (ABBA, {m['reps']} reps), so a drift of the "
            "machine cancels. The figure of a side is the median over its reps; new/base is the "
            "median of the per-rep ratios (each rep's ratio in brackets); within noise means "
            f"{1 - NOISE:.2f} ≤ new/base ≤ {1 + NOISE:.2f}.", "",
            f"Machine load (1-minute average, `/proc/loadavg`, the benchmark's own load "
            f"included): {load_text}; at start / end {m['machine']['load average at start / end']}.",
            "", "| machine | |", "|---|---|"]
        out += [f"| {k} | {v} |" for k, v in m["machine"].items()
                if k != "load average at start / end"]
        out += ["", "### Figures", "",
                "| figure | what | base | new | new/base | within ±10 %? |",
                "|---|---|---|---|---|---|"] + rows + [""]
        out += ["### Raw measurements", "",
                "Medians over the reps; new/base is the median of the per-rep ratios.", "",
                "| figure | measurement | base | new | new/base |", "|---|---|---|---|---|"]
        out += raw_rows + [""]
        out += ["### Notes", ""]
        outside = [p for p, (r, w, b) in verdicts.items() if not w or b]
        out += [f"- Outside noise: {', '.join(outside) if outside else 'none'}."]
        if notes:
            out += ["- Behaviour, not speed: what differs between the two binaries where a "
                    "figure touches it."] + ["  " + n for n in notes]
        out += [""]
        out += ["### Runs", "", "| figure | rep | order | side | run | req/s | p50 ms | p99 ms | "
                "non-2xx | socket errors | server CPU/request | machine busy |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted((r for r in self.results if r.get("kind") == "wrk"
                         and r.get("id") in m["figures"]),
                        key=lambda r: (r["id"], r["rep"], r["order"])):
            out.append(f"| {r['id']} | {r['rep']} | {r['order']} | {side_of(r)} | {r['variant']} | "
                       f"{r['rps']:,.0f} | {r['lat_p50_us'] / 1000:.3f} | {r['lat_p99_us'] / 1000:.3f} | "
                       f"{r['non2xx']:,} | {Report.socket_errors(r)} | {cpu_split(r)} | "
                       f"{r['mach_busy_frac'] * 100:.0f}% |")
        copies = sorted((r for r in self.results if r.get("kind") == "copy"),
                        key=lambda r: (r["rep"], r["order"]))
        if copies:
            out += ["", "| P5 rep | order | side | tool | seconds | note |", "|---|---|---|---|---|---|"]
            for r in copies:
                note = ""
                if r.get("srv_user_s") is not None:
                    note = (f"server CPU user {r['srv_user_s']:.2f} s, sys {r['srv_sys_s']:.2f} s, "
                            f"{r.get('polls', 0)} polls")
                out.append(f"| {r['rep']} | {r['order']} | {r['side']} | {r['tool']} | "
                           f"{r['seconds']:.3f} | {note} |")
        out += ["", "### To reproduce", "",
                "```sh",
                "git worktree add --detach ../base 5ef79c4 && (cd ../base && cargo build --release --locked)",
                "cargo build --release --locked",
                f"{m['command']}",
                "```", "",
                "Set-up, in order, for each side (`image-replicator` is that side's binary; "
                "`A_*`, `B_*` are the HTTP stores, `C_*` the copy stores):", "", "```sh"]
        # Both sides ran the same commands: shown once, with $SIDE for base or new.
        def one_side(lines):
            return [l.replace("_base", "_$SIDE") for l in lines if "_new" not in l]
        out += one_side(m["setup_commands"]) + [
            "```", "", "Load and copies (`$PORT_*` are the servers' ports, `$TOKEN_*` their "
            "tokens, `$REGION_OT1_*` the directory of region ot1 in the copy stores):", "", "```sh"]
        seen = []
        for r in self.results:
            cmd = r.get("cmd")
            if cmd and cmd not in seen and r.get("id") in m["figures"]:
                seen.append(cmd)
        seen = list(dict.fromkeys(one_side(seen)))
        out += seen + ["```", "", COMPARE_END, ""]
        return "\n".join(out)


def compare_block(text):
    """The comparison section of a BENCHMARKS.md text, or None."""
    start, end = text.find(COMPARE_START), text.find(COMPARE_END)
    if start < 0 or end < start:
        return None
    return text[start:end + len(COMPARE_END)] + "\n"


def cmd_compare_report(args):
    results = [json.loads(l) for l in open(args.results, encoding="utf-8") if l.strip()]
    meta = json.load(open(args.meta, encoding="utf-8"))
    block = Compare(results, meta).render()
    old = open(args.out, encoding="utf-8").read() if os.path.exists(args.out) else ""
    kept = compare_block(old)
    if kept:
        text = old.replace(kept, block)
    elif old:
        text = old.rstrip("\n") + "\n\n" + block
    else:
        text = "# Benchmarks\n\n" + block
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("jobs")
    s.add_argument("out")
    s.add_argument("--tenant", required=True)
    s.add_argument("--region", required=True)
    s.add_argument("--count", type=int, required=True)
    s.add_argument("--seed", type=int, required=True)
    s.set_defaults(func=cmd_jobs)

    s = sub.add_parser("snap")
    s.add_argument("pid", type=int)
    s.set_defaults(func=cmd_snap)

    s = sub.add_parser("metrics")
    s.add_argument("port", type=int)
    s.set_defaults(func=cmd_metrics)

    s = sub.add_parser("wrk-record")
    s.add_argument("results")
    s.add_argument("wrk_output")
    s.add_argument("before")
    s.add_argument("after")
    s.add_argument("--metrics-before")
    s.add_argument("--metrics-after")
    s.add_argument("--rss-samples")
    s.add_argument("fields", nargs="*")
    s.set_defaults(func=cmd_wrk_record)

    s = sub.add_parser("api-copy")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--token", required=True)
    s.add_argument("--image", required=True)
    s.add_argument("--dst", required=True)
    s.add_argument("--pid", type=int)
    s.add_argument("--timeout", type=float, default=600)
    s.add_argument("--poll", type=float, default=0.05)
    s.set_defaults(func=cmd_api_copy)

    s = sub.add_parser("kill-at")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--token", required=True)
    s.add_argument("--image", required=True)
    s.add_argument("--dst", required=True)
    s.add_argument("--pid", type=int, required=True)
    s.add_argument("--region-dir", required=True)
    s.add_argument("--percent", type=float, required=True)
    s.add_argument("--size", type=int, required=True)
    s.add_argument("--timeout", type=float, default=600)
    s.set_defaults(func=cmd_kill_at)

    s = sub.add_parser("wait-job")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--token", required=True)
    s.add_argument("--job", required=True)
    s.add_argument("--since", type=float, required=True)
    s.add_argument("--poll", type=float, default=0.01)
    s.add_argument("--timeout", type=float, default=600)
    s.set_defaults(func=cmd_wait_job)

    s = sub.add_parser("time-json")
    s.add_argument("--pid", type=int)
    s.add_argument("command", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_time_json)

    s = sub.add_parser("time")
    s.add_argument("command", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_time)

    s = sub.add_parser("get-time")
    s.add_argument("url")
    s.set_defaults(func=cmd_get_time)

    s = sub.add_parser("record")
    s.add_argument("results")
    s.add_argument("fields", nargs="*")
    s.set_defaults(func=cmd_record)

    s = sub.add_parser("count")
    s.set_defaults(func=cmd_count)

    s = sub.add_parser("field")
    s.add_argument("path", nargs="*")
    s.set_defaults(func=cmd_field)

    s = sub.add_parser("compare-report")
    s.add_argument("--results", required=True)
    s.add_argument("--meta", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_compare_report)

    s = sub.add_parser("report")
    s.add_argument("--results", required=True)
    s.add_argument("--meta", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_report)

    args = p.parse_args()
    if getattr(args, "command", None) and args.command[:1] == ["--"]:
        args.command = args.command[1:]
    args.func(args)


if __name__ == "__main__":
    main()
