#!/usr/bin/env python3
"""Peer side of scripts/bench.sh (`--only D`): timed copies between two appliances through
scripts/bench/relay.py, timed plain downloads of the same image, manifests, and the report
section "Peer appliances" (D1-D4). Standard library only (python3 >= 3.9).

Every measurement is one JSON object per line in the run's results file (kind "peer"); `report`
turns them into scripts/bench/peer.md and puts that section into BENCHMARKS.md.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.dont_write_bytecode = True  # no __pycache__ in scripts/bench
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import helper  # noqa: E402  (the bench's own helpers: http, snapshots, jobs)
import relay  # noqa: E402

MIB = 1024 * 1024
START = "<!-- scripts/bench.sh --only D: start -->"
END = "<!-- scripts/bench.sh --only D: end -->"
GOALS = {"D1": 0.10, "D2": 1.1, "D3": 0.005, "D4": 0.01}


def cpu_of(pids):
    """utime + stime (s) of each named process."""
    out = {}
    for name, pid in pids.items():
        try:
            s = helper.snapshot(pid)
            out[name] = s["utime"] + s["stime"]
        except OSError:
            out[name] = None
    return out


def cpu_delta(before, after):
    return {k: (after[k] - before[k]) if before.get(k) is not None and after.get(k) is not None
            else None for k in before}


def parse_pids(text):
    return {k: int(v) for k, v in (p.split("=") for p in text.split(","))}


def job_show(bin_, data_dir, job_id):
    out = subprocess.run([bin_, "--data-dir", data_dir, "--json", "job", "show", job_id],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"peer.py: job show {job_id} failed: {out.stderr.strip()}")
    return json.loads(out.stdout)


def cmd_job(args):
    """POSTs a copy to the edge, polls it until replicated; wall time, the relay's counts, the
    job's own counts and the processes' CPU meanwhile, as JSON."""
    pids = parse_pids(args.pids)
    r0 = relay.control(args.control, "stats")
    c0 = cpu_of(pids)

    def why_failed(job_id):
        shown = job_show(args.bin, args.data_dir, job_id)
        return shown.get("error", shown)

    done = helper.copy_and_wait(args.port, args.token, args.image, args.dst, args.poll,
                                args.timeout, why_failed)
    seconds, job_id, job = done["seconds"], done["job_id"], done["job"]
    c1 = cpu_of(pids)
    r1 = relay.control(args.control, "stats")
    shown = job_show(args.bin, args.data_dir, job_id)
    print(json.dumps({
        "tool": "job", "seconds": seconds, "job_id": job_id,
        "dest_image_id": shown.get("destination_image_id") or job.get("destination_image_id"),
        "up": r1["up"] - r0["up"], "down": r1["down"] - r0["down"],
        "connections": r1["connections"] - r0["connections"],
        "bytes_reused": shown.get("bytes_reused"), "bytes_fetched": shown.get("bytes_fetched"),
        "bytes_on_wire": shown.get("bytes_on_wire"), "cpu": cpu_delta(c0, c1),
    }))


def cmd_curl(args):
    """curl -o FILE of the peer's plain download through the relay; the same fields as `job`."""
    pids = parse_pids(args.pids)
    r0 = relay.control(args.control, "stats")
    c0 = cpu_of(pids)
    started = time.perf_counter()
    out = subprocess.run(["curl", "-sS", "-o", args.output, "-H", f"X-Auth-Token: {args.token}",
                          "-w", "%{http_code} %{size_download}", args.url],
                         capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    c1 = cpu_of(pids)
    r1 = relay.control(args.control, "stats")
    code, _, size = out.stdout.partition(" ")
    if out.returncode != 0 or code != "200":
        sys.exit(f"peer.py: curl answered {out.stdout!r} {out.stderr.strip()}")
    # The job's copy is durable before `replicated`; curl's is not until this fsync.
    fd = os.open(args.output, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    synced = time.perf_counter() - started
    os.unlink(args.output)
    print(json.dumps({"tool": "curl", "seconds": seconds, "synced_seconds": synced,
                      "downloaded": int(size),
                      "up": r1["up"] - r0["up"], "down": r1["down"] - r0["down"],
                      "connections": r1["connections"] - r0["connections"],
                      "cpu": cpu_delta(c0, c1)}))


def cmd_manifest(args):
    status, body = helper.http("GET", f"http://127.0.0.1:{args.port}/peer/v1/images/"
                               f"{args.image}/manifest", args.token)
    if status != 200:
        sys.exit(f"peer.py: GET manifest answered {status}: {body[:200]!r}")
    print(json.dumps({"manifest_bytes": len(body)}))


def cmd_idle(args):
    """The relay's counts over `seconds` with no job: what the edge sends on its own."""
    r0 = relay.control(args.control, "stats")
    time.sleep(args.seconds)
    r1 = relay.control(args.control, "stats")
    print(json.dumps({"seconds": args.seconds, "up": r1["up"] - r0["up"],
                      "down": r1["down"] - r0["down"]}))


# ----- the report --------------------------------------------------------------------------

def b(n):
    """Bytes, readable."""
    if n is None:
        return "n/a"
    if n >= 10 * MIB:
        return f"{n / MIB:,.1f} MiB"
    if n >= 10 * 1024:
        return f"{n / 1024:,.1f} KiB"
    return f"{n:,} B"


def pct(x):
    return f"{x * 100:.2f} %" if x >= 0.001 else f"{x * 100:.3f} %"


def met(ok):
    return "**met**" if ok else "**missed**"


def cpu_text(cpu):
    return ", ".join(f"{k} {v:.2f} s" for k, v in cpu.items() if v is not None)


class Report:
    def __init__(self, results, meta):
        self.all = [r for r in results if r.get("kind") == "peer"]
        self.meta = meta
        self.images = {r["format"]: r for r in results if r.get("kind") == "peer-images"}
        self.info = [r for r in results if r.get("kind") == "peer-info"]
        self.profiles = [r for r in results if r.get("kind") == "peer-profile"]

    def find(self, **match):
        return [r for r in self.all if all(r.get(k) == v for k, v in match.items())]

    def wire(self, r):
        return r["up"] + r["down"]

    def render(self):
        m = self.meta
        rows, details, whys = [], [], []
        formats = [f for f in ("raw", "qcow2") if self.find(format=f)]

        # D1 and D4: one transfer each (deterministic byte counts; its time is shown too).
        for pid, step, what in (("D1", "v2 after v1", "v2 after v1 is at the destination"),
                                ("D4", "v2 again", "the same image a second time")):
            for direction in ("pull", "push"):
                for fmt in formats:
                    rs = self.find(id=pid, format=fmt, direction=direction)
                    if not rs:
                        continue
                    r = rs[-1]
                    ratio = self.wire(r) / r["size"]
                    ok = ratio <= GOALS[pid]
                    rows.append(
                        f"| {pid} | {what}, {direction}, {fmt} ({b(r['size'])}) | "
                        f"{pct(ratio)}: {b(self.wire(r))} on the wire ({b(r['up'])} up, "
                        f"{b(r['down'])} down); the job: fetched {b(r['bytes_fetched'])}, "
                        f"on wire {b(r['bytes_on_wire'])}, reused {b(r['bytes_reused'])}; "
                        f"{r['seconds']:.2f} s | ≤ {pct(GOALS[pid])} | {met(ok)} |")
                    if not ok and not r.get("bytes_reused"):
                        whys.append(f"- {pid} {direction} {fmt}: nothing was reused (bytes_reused "
                                    f"0): the receiving appliance took none of the chunks it "
                                    f"holds, so every data chunk crossed ({b(r['bytes_fetched'])}"
                                    f", {b(r['bytes_on_wire'])} compressed).")
                    elif not ok:
                        whys.append(f"- {pid} {direction} {fmt}: {b(self.wire(r))} crossed, of "
                                    f"which the job counts {b(r['bytes_on_wire'])} as chunk "
                                    f"frames and manifest; the rest is records and HTTP.")

        # D2: side by side, reps alternating; median of per-rep ratios, and best of each.
        for fmt in formats:
            for link in ("loopback", "thin"):
                jobs = {r["rep"]: r for r in self.find(id="D2", format=fmt, link=link, tool="job")}
                curls = {r["rep"]: r for r in self.find(id="D2", format=fmt, link=link, tool="curl")}
                reps = sorted(set(jobs) & set(curls))
                if not reps:
                    continue
                ratios = [jobs[k]["seconds"] / curls[k]["seconds"] for k in reps]
                ratio = statistics.median(ratios)
                synced = statistics.median(
                    jobs[k]["seconds"] / curls[k].get("synced_seconds", curls[k]["seconds"])
                    for k in reps)
                best = min(jobs[k]["seconds"] for k in reps) / min(curls[k]["seconds"] for k in reps)
                j, c = jobs[reps[0]], curls[reps[0]]
                rate = j.get("rate") or 0
                link_text = "loopback, no limit" if not rate else \
                    f"relay limited to {rate / 1e6:g} MB/s each way ({rate * 8 / 1e6:g} Mbit/s)"
                ok = ratio <= GOALS["D2"]
                rows.append(
                    f"| D2 | nothing in common, pull, {fmt} ({b(j['size'])}), {link_text}: "
                    f"job ÷ `curl -o` of `/peer/v1/images/ID/file` | {ratio:.3f} (runs: "
                    f"{', '.join(f'{x:.3f}' for x in ratios)}; best ÷ best {best:.3f}; "
                    f"÷ curl + fsync of its file {synced:.3f}); job "
                    f"{statistics.median(jobs[k]['seconds'] for k in reps):.2f} s moving "
                    f"{b(self.wire(j))}, curl {statistics.median(curls[k]['seconds'] for k in reps):.2f} s "
                    f"moving {b(self.wire(c))} | ≤ {GOALS['D2']} | {met(ok)} |")
                for k in reps:
                    for r in (jobs[k], curls[k]):
                        details.append(
                            f"| D2 {fmt} {link} | {k} | {r.get('order', '')} | {r['tool']} | "
                            f"{r['seconds']:.3f} | {b(r['up'])} | {b(r['down'])} | "
                            f"{b(r.get('bytes_fetched'))} | {b(r.get('bytes_on_wire'))} | "
                            f"{b(r.get('bytes_reused'))} | {cpu_text(r['cpu'])} |")
                if not ok:
                    jc = statistics.median(jobs[k]["cpu"].get("edge") or 0 for k in reps)
                    cc = statistics.median(jobs[k]["cpu"].get("central") or 0 for k in reps)
                    rc = statistics.median(jobs[k]["cpu"].get("relay") or 0 for k in reps)
                    js = statistics.median(jobs[k]["seconds"] for k in reps)
                    cs = statistics.median(curls[k]["seconds"] for k in reps)
                    ccurl = statistics.median(curls[k]["cpu"].get("central") or 0 for k in reps)
                    rcurl = statistics.median(curls[k]["cpu"].get("relay") or 0 for k in reps)
                    whys.append(
                        f"- D2 {fmt} {link}: the job takes {js:.2f} s, in which the edge uses "
                        f"{jc:.2f} s of CPU, the central {cc:.2f} s and the relay {rc:.2f} s "
                        f"(medians; {m['machine'].get('CPUs (nproc)', '?')} CPUs); curl takes "
                        f"{cs:.2f} s, the central {ccurl:.2f} s and the relay {rcurl:.2f} s.")

        # D3
        for fmt in formats:
            for r in self.find(id="D3", format=fmt):
                ratio = r["manifest_bytes"] / r["size"]
                rows.append(f"| D3 | manifest ÷ image, {fmt} {r['image']} ({b(r['size'])}) | "
                            f"{pct(ratio)}: {r['manifest_bytes']:,} B | ≤ {pct(GOALS['D3'])} | "
                            f"{met(ratio <= GOALS['D3'])} |")

        # Every transfer of D1/D4 (and the v1 before them) in detail.
        for r in self.all:
            if r["id"] in ("D1", "D4", "v1"):
                details.append(
                    f"| {r['id']} {r['direction']} {r['format']} | 1 | | {r['tool']} | "
                    f"{r['seconds']:.3f} | {b(r['up'])} | {b(r['down'])} | "
                    f"{b(r.get('bytes_fetched'))} | {b(r.get('bytes_on_wire'))} | "
                    f"{b(r.get('bytes_reused'))} | {cpu_text(r['cpu'])} |")

        out = [START, "## Peer appliances (issue 14): D1-D4", ""]
        if m["mode"] == "quick":
            out += ["> **Quick mode**: a small tree and image, one rep, to check that the "
                    "benchmark works. These figures are not comparable with the goals.", ""]
        out += [f"Measured {m['started']} to {m['finished']} with `{m['command']}` on commit "
                f"`{m['commit']}`, in one run: two release binaries of that commit on "
                "127.0.0.1, a central appliance (directory region ot1) and an edge appliance "
                "(directory region edge; the central's ot1 as its peer region), every byte "
                "between them through `scripts/bench/relay.py`, which counts each direction "
                "(HTTP, records and manifests included) and can limit each direction's rate. "
                "The edge is the client in both directions: \"up\" is edge → central, \"down\" "
                "central → edge.", ""]
        out += ["| | |", "|---|---|"]
        for key, value in m["machine"].items():
            out.append(f"| {key} | {value} |")
        out += [""]
        for fmt, r in self.images.items():
            out.append(f"- {fmt}: v1 {b(r['v1_size'])} ({b(r['v1_alloc'])} allocated), v2 "
                       f"{b(r['v2_size'])} ({b(r['v2_alloc'])} allocated).")
        out += [f"- {i['detail']}" for i in self.info]
        out += ["", "| id | what | figure | goal | result |", "|---|---|---|---|---|"]
        out += sorted(rows, key=lambda row: row[:5]) + [""]
        if self.profiles:
            out += ["### Where a copy's CPU goes (perf)", "",
                    "One more D2 copy on the loopback, not timed, under `perf record -F 999` of both "
                    "appliances (`BENCH_PEER_PERF=DIR`); the symbols with the most samples "
                    "(self), per process:", ""]
            for r in self.profiles:
                cpu = f" ({r['cpu_s']:.2f} s of CPU sampled)" if r.get("cpu_s") else ""
                out += [f"- {r['format']}, {r['process']}{cpu}: " + "; ".join(r["top"])]
            out += [""]
        if whys:
            out += ["### Where the misses come from", ""] + whys + [""]
        out += ["### Every transfer", "",
                "Seconds from the POST until the job is `replicated` (polled every "
                f"{m['poll'] * 1000:.0f} ms), or curl's run; the relay's counts over that time; "
                "the job's `bytes_fetched`, `bytes_on_wire`, `bytes_reused` (`job show --json`); "
                "CPU (user + system, /proc/PID/stat) of each process meanwhile.", "",
                "| step | rep | order | tool | seconds | up | down | fetched | on wire | reused | CPU |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        out += details + [""]
        out += ["### Method and how to reproduce", "",
                f"`{m['command']}` from the repository's root (`--quick`: a small tree, one rep). "
                "It builds the release binary unless `--no-build`, builds the images with "
                "`scripts/chunk-size.sh --images-only DIR` (environment: "
                f"`CHUNK_SIZE_IMAGE={m['image_size']}`, `CHUNK_SIZE_TREE=\"{m['tree']}\"`): v1 "
                "is a raw ext4 image made by `mkfs.ext4 -d` of a copy of that tree, v2 the same "
                "image after a mimicked package update written in place by `debugfs -w`, and "
                "both converted to qcow2 (`qemu-img convert -O qcow2`).", "",
                "- D2: each rep deletes the edge's copy first, so v1 never finds anything of "
                f"itself at the edge; {m['reps']} rep(s) per link, the job and curl back to "
                "back, alternating which goes first; the figure is the median of the per-rep "
                "ratios. curl writes its file into the run's temporary directory (not synced; "
                "the job's copy is made durable before `replicated`).",
                "- D1: v1 is pulled (its figures are the \"v1\" rows), then v2: wire bytes of v2 "
                "÷ v2's size. D4: v2 again into the same tenant. Push: the edge's copies of v1 "
                "and v2 are pushed into another tenant of the central that holds nothing yet.",
                "- D3: the length of `GET /peer/v1/images/ID/manifest`.", "",
                "```sh"] + m["setup_commands"] + ["```", "", END, ""]
        return "\n".join(out)


def cmd_report(args):
    results = [json.loads(l) for l in open(args.results, encoding="utf-8") if l.strip()]
    meta = json.load(open(args.meta, encoding="utf-8"))
    block = Report(results, meta).render()
    with open(args.md, "w", encoding="utf-8") as f:
        f.write(block)
    helper.put_section(args.out, START, END, block)
    print(block)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("job")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--token", required=True)
    s.add_argument("--image", required=True)
    s.add_argument("--dst", required=True)
    s.add_argument("--control", type=int, required=True)
    s.add_argument("--pids", required=True)
    s.add_argument("--bin", required=True)
    s.add_argument("--data-dir", required=True)
    s.add_argument("--poll", type=float, default=0.02)
    s.add_argument("--timeout", type=float, default=900)
    s.set_defaults(func=cmd_job)
    s = sub.add_parser("curl")
    s.add_argument("--url", required=True)
    s.add_argument("--token", required=True)
    s.add_argument("--output", required=True)
    s.add_argument("--control", type=int, required=True)
    s.add_argument("--pids", required=True)
    s.set_defaults(func=cmd_curl)
    s = sub.add_parser("manifest")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--token", required=True)
    s.add_argument("--image", required=True)
    s.set_defaults(func=cmd_manifest)
    s = sub.add_parser("idle")
    s.add_argument("--control", type=int, required=True)
    s.add_argument("--seconds", type=float, default=2)
    s.set_defaults(func=cmd_idle)
    s = sub.add_parser("report")
    s.add_argument("--results", required=True)
    s.add_argument("--meta", required=True)
    s.add_argument("--md", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_report)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
