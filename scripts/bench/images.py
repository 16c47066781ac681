#!/usr/bin/env python3
"""Images side of scripts/bench.sh (`--only I`, scripts/bench/images.sh): I1 (upload) and I2
(download) of one image through the appliance's images API, through a real Glance 33 (file
store) and with cp, in the same run. Standard library only (python3 >= 3.9).

    images.py run --results R --file IMAGE --work DIR --store DIR --reps N --port P --token T
                  --pid PID --venv VENV --setup-log F [--perf DIR]
    images.py report --results R --setup-log F --out BENCHMARKS.md

`run` starts Glance with tests/openstack/lab.py (--auth none, one Glance) from VENV and, per
rep, in an order that rotates, times each upload (curl -T into PUT .../file of a fresh image
record; cp + sync of the file), a download of each stored copy from the disk (to /dev/null,
after posix_fadvise DONTNEED), and each download from the page cache (curl -o a file from
GET .../file; cp of the file, no sync), with the CPU of the appliance, of Glance and of curl; one JSON line per step
(kind "images") into the results. `report` turns them into the section "Images API" of
BENCHMARKS.md (replaced between its markers, the rest of the file kept).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request

sys.dont_write_bytecode = True  # no __pycache__ in scripts/bench
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import helper  # noqa: E402  (the bench's own helpers: snapshots, the compare marker)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MIB = 1024 * 1024
START = "<!-- scripts/bench.sh --only I: start -->"
END = "<!-- scripts/bench.sh --only I: end -->"
# figure -> (what the appliance is compared with, goal: appliance rate / that rate at least)
GOALS = {("I1", "glance"): 3.0, ("I1", "cp"): 0.7, ("I2", "glance"): 1.5, ("I2", "cp"): 0.7}
OWNER = "5a6b7c8d9e0f4a1b8c2d3e4f5a6b7c8d"
_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def call(method, url, body=None, token=None):
    headers = {}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if token:
        headers["X-Auth-Token"] = token
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with _http.open(req, timeout=600) as resp:
            text = resp.read()
            status = resp.status
    except urllib.error.HTTPError as e:
        text, status = e.read(), e.code
    return status, (json.loads(text) if text.strip().startswith(b"{") else text)


def group_cpu(pgid):
    """utime + stime (s) of every process in process group pgid."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            total += (int(fields[11]) + int(fields[12])) / helper.TICK
    return total


def pid_cpu(pid):
    s = helper.snapshot(pid)
    return s["utime"] + s["stime"]


class Lab:
    """One no-auth Glance from tests/openstack/lab.py."""

    def __init__(self, venv, work):
        self.proc = subprocess.Popen(
            [os.path.join(venv, "bin/python"), os.path.join(ROOT, "tests/openstack/lab.py"),
             "--dir", os.path.join(work, "glance-lab"), "--glance", "1"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            sys.exit("images.py: the Glance lab did not start (see its lab.log)")
        self.info = json.loads(line)
        self.url = self.info["glance"][0]["url"]
        self.proc.stdin.write("status\n")
        self.proc.stdin.flush()
        self.pgid = json.loads(self.proc.stdout.readline())["pgids"]["glance"][0]

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def timed(cmd):
    start = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    took = time.monotonic() - start
    if out.returncode != 0:
        sys.exit(f"images.py: {' '.join(cmd)} failed: {out.stderr.strip()[:300]}")
    return took, out.stdout


def cmd_run(args):
    size = os.path.getsize(args.file)
    app = f"http://127.0.0.1:{args.port}"
    lab = Lab(args.venv, args.work)
    with open(args.setup_log, "a", encoding="utf-8") as f:
        f.write("python tests/openstack/lab.py --dir $TMP/glance-lab --glance 1   # venv of "
                "scripts/openstack-venv.sh; then $GLANCE_URL\n")
    out = os.path.join(args.work, "download.out")
    dst = os.path.join(args.work, "cp.out")
    meta = {"name": "bench", "disk_format": "raw", "container_format": "bare"}
    systems = {
        "appliance": (app, args.token, {}),
        "glance": (lab.url, None, {"owner": OWNER}),
    }
    cpus = {"appliance": lambda: pid_cpu(args.pid), "glance": lambda: group_cpu(lab.pgid)}

    def step(rep, order, system, op, cmd, image=None):
        # What earlier steps left dirty is written back first, untimed: no step pays for
        # another's writeback (3 GiB of dirty pages per rep otherwise).
        os.sync()
        before = {k: f() for k, f in cpus.items()}
        client = os.times()
        took, stdout = timed(cmd)
        after = {k: f() for k, f in cpus.items()}
        ended = os.times()
        rec = {"kind": "images", "rep": rep, "order": order, "system": system, "op": op,
               "seconds": took, "bytes": size,
               "cpu": {k: after[k] - before[k] for k in cpus},
               # curl's own (or cp's): what the client side of the transfer took.
               "client_cpu": (ended.children_user + ended.children_system
                              - client.children_user - client.children_system)}
        if stdout.strip():
            rec["http"] = stdout.strip()
        if image:
            rec["image"] = image
        helper.append(args.results, rec)
        return rec

    def upload(rep, order, system):
        if system == "cp":
            return step(rep, order, "cp", "upload",
                        ["sh", "-c", 'cp "$1" "$2" && sync "$2"', "cp", args.file, dst])
        base, token, extra = systems[system]
        status, image = call("POST", base + "/v2/images", {**meta, **extra}, token)
        if status != 201:
            sys.exit(f"images.py: POST {base}/v2/images answered {status}: {image}")
        rec = step(rep, order, system, "upload",
                   ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT",
                    "-H", "Expect:", "-H", "Content-Type: application/octet-stream",
                    *(["-H", f"X-Auth-Token: {token}"] if token else []),
                    "-T", args.file, f"{base}/v2/images/{image['id']}/file"], image["id"])
        if rec.get("http") != "204":
            sys.exit(f"images.py: the upload to {system} answered {rec.get('http')}")
        return rec

    def download(rep, order, system, image):
        if system == "cp":
            rec = step(rep, order, "cp", "download", ["cp", args.file, out])
        else:
            base, token, _ = systems[system]
            rec = step(rep, order, system, "download",
                       ["curl", "-sS", "-o", out, "-w", "%{http_code}",
                        *(["-H", f"X-Auth-Token: {token}"] if token else []),
                        f"{base}/v2/images/{image}/file"])
            if rec.get("http") != "200":
                sys.exit(f"images.py: the download from {system} answered {rec.get('http')}")
        if os.path.getsize(out) != size:
            sys.exit(f"images.py: the download from {system} has {os.path.getsize(out)} bytes")
        if rep == 1 and subprocess.run(["cmp", "-s", args.file, out]).returncode != 0:
            sys.exit(f"images.py: the download from {system} differs from the image")
        os.remove(out)

    def stream(rep, order, system, image, op="stream"):
        base, token, _ = systems[system]
        rec = step(rep, order, system, op,
                   ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                    *(["-H", f"X-Auth-Token: {token}"] if token else []),
                    f"{base}/v2/images/{image}/file"])
        if rec.get("http") != "200":
            sys.exit(f"images.py: the download from {system} answered {rec.get('http')}")

    def stored(system, image, advice):
        """Drops the stored copy of `image` from the page cache (`advice`), or reads it in."""
        path = os.path.join(args.store if system == "appliance" else lab.info["glance"][0]
                            ["store_dir"], image)
        with open(path, "rb") as f:
            if advice is None:
                while f.read(1 << 20):
                    pass
            else:
                os.sync()
                os.posix_fadvise(f.fileno(), 0, 0, advice)

    try:
        # What the hashes an upload must compute cost alone here, on one core each.
        for tool in ("md5sum", "sha512sum"):
            took, _ = timed([tool, args.file])
            helper.append(args.results, {"kind": "images-hash", "tool": tool,
                                         "seconds": took, "bytes": size})
        names = ["appliance", "glance", "cp"]
        for rep in range(1, args.reps + 1):
            order = names[(rep - 1) % 3:] + names[:(rep - 1) % 3]
            images = {}
            for i, system in enumerate(order, 1):
                images[system] = upload(rep, i, system).get("image")
            # Downloads from the disk, to /dev/null, beside I2 (not part of it): each stored
            # copy is dropped from the page cache first (the appliance's is not in it: it
            # writes images with O_DIRECT). Then both are read into the page cache, untimed,
            # so that the timed downloads compare the services, not the disk.
            for i, system in enumerate(o for o in order if o != "cp"):
                stored(system, images[system], os.POSIX_FADV_DONTNEED)
                stream(rep, i + 1, system, images[system], "cold")
            for system in ("appliance", "glance"):
                stored(system, images[system], None)
            # The first file written after the uploads is written slowly, whoever writes it
            # (2.5-3.9 s instead of 0.4-1.2 s for 1 GiB, in every rep here): an untimed copy
            # takes that turn, so that the timed downloads compare the services.
            subprocess.run(["cp", args.file, out], check=True)
            os.remove(out)
            for i, system in enumerate(order, 1):
                download(rep, i, system, images[system])
            for i, system in enumerate(o for o in order if o != "cp"):
                stream(rep, i + 1, system, images[system])
            for system, image in images.items():
                if system != "cp":
                    base, token, _ = systems[system]
                    call("DELETE", f"{base}/v2/images/{image}", token=token)
            os.remove(dst)
        if args.perf:
            profile(args, app, meta, out)
    finally:
        lab.close()


def profile(args, app, meta, out):
    """One more upload and download through the appliance, not timed, under perf record."""
    os.makedirs(args.perf, exist_ok=True)
    _, image = call("POST", app + "/v2/images", meta, args.token)
    for op, cmd in (
            ("upload", ["curl", "-sS", "-o", "/dev/null", "-X", "PUT", "-H", "Expect:",
                        "-H", "Content-Type: application/octet-stream",
                        "-H", f"X-Auth-Token: {args.token}", "-T", args.file,
                        f"{app}/v2/images/{image['id']}/file"]),
            ("download", ["curl", "-sS", "-o", out, "-H", f"X-Auth-Token: {args.token}",
                          f"{app}/v2/images/{image['id']}/file"])):
        data = os.path.join(args.perf, f"{op}.data")
        perf = subprocess.Popen(["perf", "record", "-F", "999", "-g", "-o", data, "-p",
                                 str(args.pid)], stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        subprocess.run(cmd, check=True)
        perf.send_signal(2)
        perf.wait()
        with open(os.path.join(args.perf, f"{op}.txt"), "w") as f:
            subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children",
                            "--sort", "dso,symbol", "--percent-limit", "1"],
                           stdout=f, stderr=subprocess.DEVNULL, check=False)
    os.remove(out)
    call("DELETE", f"{app}/v2/images/{image['id']}", token=args.token)


def mbs(size, seconds):
    return size / MIB / seconds


def cmd_report(args):
    rows = [json.loads(l) for l in open(args.results, encoding="utf-8") if l.strip()]
    hashes = {r["tool"]: r for r in rows if r.get("kind") == "images-hash"}
    rows = [r for r in rows if r.get("kind") == "images"]
    env = os.environ
    size = rows[0]["bytes"]
    reps = sorted({r["rep"] for r in rows})
    t = {(r["rep"], r["system"], r["op"]): r for r in rows}
    fs = " on ".join((subprocess.run(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "--target",
                                      env["TMP"]], capture_output=True, text=True)
                      .stdout.splitlines() or ["n/a"])[0].split())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip() or "unknown"
    if subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                      capture_output=True, text=True, cwd=ROOT).stdout.strip():
        commit += " (with uncommitted changes)"
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                if l.startswith("model name")), "n/a")
    load_end = " ".join(open("/proc/loadavg").read().split()[:3])
    out = [START, "## Images API (issue 15): I1, I2", "",
           f"Measured {env['STARTED']} to {env['FINISHED']} with `{env['COMMAND_LINE']}` on "
           f"commit `{commit}`, in one run: one image of {size / MIB:,.0f} MiB of random data, "
           f"uploaded and downloaded with curl through the appliance (`{env['BIN']}`, its "
           "directory region in the run's temporary directory) and through Glance 33 "
           "(`tests/openstack/lab.py --auth none`: one gunicorn worker, file store in the same "
           "directory), and copied with `cp`, all on one file system "
           f"({fs}; {os.cpu_count()} CPUs, {cpu}; load average at start / end "
           f"{env['LOAD_START']} / {load_end}). {len(reps)} rep(s); the order of the three "
           "rotates per rep; each figure is the median of the per-rep ratios of rates "
           "(appliance MiB/s ÷ the other's MiB/s).", "",
           "| id | what | figure | goal | result |", "|---|---|---|---|---|"]
    whys = []
    for fig, op, label in (("I1", "upload", "upload"), ("I2", "download", "download"),
                           ("I2", "stream", "download")):
        for other in (("glance",) if op == "stream" else ("glance", "cp")):
            ratios = [t[(r, other, op)]["seconds"] / t[(r, "appliance", op)]["seconds"]
                      for r in reps]
            med = statistics.median(ratios)
            goal = GOALS[(fig, other)]
            app_rate = statistics.median(mbs(size, t[(r, "appliance", op)]["seconds"]) for r in reps)
            other_rate = statistics.median(mbs(size, t[(r, other, op)]["seconds"]) for r in reps)
            if op == "stream":
                what = "download rate to /dev/null ÷ Glance's (the services alone, no file written)"
            elif other == "glance":
                what = f"{label} rate ÷ Glance's ({'PUT' if op == 'upload' else 'GET'} …/file)"
            elif op == "upload":
                what = "upload rate ÷ `cp` + `sync` of the file (durable, as the upload is)"
            else:
                what = "download rate (curl -o a file) ÷ `cp` of the file (no sync)"
            other_name = "Glance" if other == "glance" else "cp"
            figure = (f"{med:.2f} (runs: {', '.join(f'{x:.2f}' for x in ratios)}); appliance "
                      f"{app_rate:,.0f} MiB/s, {other_name} {other_rate:,.0f} MiB/s (medians)")
            met = med >= goal
            out.append(f"| {fig} | {what} | {figure} | ≥ {goal} | "
                       f"**{'met' if met else 'missed'}** |")
            said = any(w.startswith(f"- {fig} against") for w in whys)
            if not met and said and op in ("upload", "download"):
                whys.append(f"- {fig} against {other_name}: the goal needs "
                            f"{goal * other_rate:,.0f} MiB/s; the same bound as above.")
            elif not met and op == "upload" and {"md5sum", "sha512sum"} <= hashes.keys():
                md5 = hashes["md5sum"]["seconds"]
                sha = hashes["sha512sum"]["seconds"]
                app_s = statistics.median(t[(r, "appliance", op)]["seconds"] for r in reps)
                app_cpu = statistics.median(t[(r, "appliance", op)]["cpu"]["appliance"]
                                            for r in reps)
                whys.append(
                    f"- {fig} against {other_name}: the goal needs {goal * other_rate:,.0f} MiB/s. "
                    "An upload must compute the image's MD5 (Glance's `checksum`) and SHA-512 "
                    "(`os_hash_value`) besides its chunks' BLAKE3. Alone, on one core each, "
                    f"coreutils' `md5sum` takes {md5:.2f} s for this image "
                    f"({mbs(size, md5):,.0f} MiB/s) and `sha512sum` {sha:.2f} s "
                    f"({(md5 + sha) / os.cpu_count():.2f} s of the whole machine's "
                    f"{os.cpu_count()} CPUs, shared with curl); the appliance's own (OpenSSL's "
                    "libcrypto) are faster, but of the same order. MD5 cannot be split "
                    "across cores: one core's MD5 rate bounds any upload. The appliance's "
                    f"upload took {app_s:.2f} s and {app_cpu:.2f} s of its CPU (medians).")
            elif not met and op == "download":
                def rate(system, kind):
                    return statistics.median(mbs(size, t[(r, system, kind)]["seconds"])
                                             for r in reps)
                def busy(system):
                    # Share of the download's wall time that curl spent on a CPU.
                    return statistics.median(t[(r, system, op)].get("client_cpu", 0)
                                             / t[(r, system, op)]["seconds"] for r in reps)
                whys.append(
                    f"- {fig} against {other_name} (to a file): the goal needs "
                    f"{goal * other_rate:,.0f} MiB/s. curl writing the file bounds both "
                    f"services: to a file the appliance runs at {rate('appliance', op):,.0f} "
                    f"and Glance at {rate('glance', op):,.0f} MiB/s, to /dev/null at "
                    f"{rate('appliance', 'stream'):,.0f} and {rate('glance', 'stream'):,.0f} "
                    "MiB/s (medians). curl was on a CPU for "
                    f"{busy('appliance'):.0%} of the appliance's download to a file and "
                    f"{busy('glance'):.0%} of Glance's: one core receiving and writing every "
                    "byte into the page cache, while `cp` copies inside the kernel "
                    "(`copy_file_range`), which no HTTP client can.")
            elif not met:
                # The services alone: both copy every byte through user space.
                app_cpu = statistics.median(t[(r, "appliance", op)]["cpu"]["appliance"]
                                            for r in reps)
                app_s = statistics.median(t[(r, "appliance", op)]["seconds"] for r in reps)
                whys.append(f"- {fig} against {other_name}: the appliance's {label} takes "
                            f"{app_s:.2f} s, in which it uses {app_cpu:.2f} s of CPU "
                            f"(medians; {os.cpu_count()} CPUs).")
    out.append("")
    if any(r["op"] == "cold" for r in rows):
        def cold_rate(system):
            return statistics.median(mbs(size, t[(r, system, "cold")]["seconds"]) for r in reps)
        def cold_cpu(system):
            return statistics.median(t[(r, system, "cold")]["cpu"][system] for r in reps)
        out += [f"Not a figure, beside I2: downloads from the disk, to /dev/null (each stored "
                "copy dropped from the page cache first; the appliance reads with O_DIRECT what "
                f"the cache does not hold): the appliance {cold_rate('appliance'):,.0f} MiB/s "
                f"with {cold_cpu('appliance'):.2f} s of its CPU, Glance "
                f"{cold_rate('glance'):,.0f} MiB/s with {cold_cpu('glance'):.2f} s (medians): "
                f"{statistics.median(t[(r, 'glance', 'cold')]['seconds'] / t[(r, 'appliance', 'cold')]['seconds'] for r in reps):.2f} "
                "of Glance's rate. The I2 downloads that follow find both copies in the page "
                "cache.", ""]
    if whys:
        out += ["### Where the misses come from", ""] + whys + [""]
    out += ["### Every transfer", "",
            "Seconds of each curl or cp (wall), the CPU (user + system, /proc) of the "
            "appliance and of Glance's process group meanwhile, and curl's (or cp's) own. "
            "`cold`: a download from the disk, to /dev/null.", "",
            "| rep | order | system | op | seconds | MiB/s | appliance CPU | Glance CPU | client CPU |",
            "|---|---|---|---|---|---|---|---|---|"]
    ops = ("upload", "cold", "download", "stream")
    for r in sorted(rows, key=lambda r: (ops.index(r["op"]), r["rep"], r["order"])):
        out.append(f"| {r['rep']} | {r['order']} | {r['system']} | {r['op']} | "
                   f"{r['seconds']:.3f} | {mbs(r['bytes'], r['seconds']):,.0f} | "
                   f"{r['cpu']['appliance']:.2f} s | {r['cpu']['glance']:.2f} s | "
                   f"{r.get('client_cpu', 0):.2f} s |")
    out += ["", "### Method and how to reproduce", "",
            "`scripts/bench.sh --only I` from the repository's root (`--quick`: a 64 MiB image, "
            "one rep; `BENCH_IMAGES_MIB` another size; `BENCH_IMAGES_PERF=DIR` one more upload "
            "and download under `perf record`, reports in DIR). It builds the release binary "
            "unless `--no-build` and makes the venv with Glance (`scripts/openstack-venv.sh`). "
            "The data stay in the page cache (nothing is dropped): the figures compare the "
            "services' own costs, not the disk's. Uploads make a fresh image record first "
            "(`POST /v2/images`, not timed); every image is deleted at the end of its rep; the "
            "first rep compares each download with the image byte for byte. The appliance writes "
            "images with O_DIRECT (past the page cache), Glance through the cache: the `cold` "
            "downloads come after `posix_fadvise(POSIX_FADV_DONTNEED)` on each stored copy, and "
            "the I2 downloads after both copies were read once into the cache (untimed).", "",
            "```sh"] + [l.rstrip("\n") for l in open(args.setup_log, encoding="utf-8")] + [
            "POST http://127.0.0.1:$PORT_APPLIANCE/v2/images {\"name\": \"bench\", \"disk_format\": \"raw\", \"container_format\": \"bare\"} with $TOKEN   # and to $GLANCE_URL with an owner",
            "curl -sS -X PUT -H 'Expect:' -H 'Content-Type: application/octet-stream' -H \"X-Auth-Token: $TOKEN\" -T $TMP/image.raw http://127.0.0.1:$PORT_APPLIANCE/v2/images/$ID/file   # I1; the same to $GLANCE_URL",
            "sh -c 'cp \"$1\" \"$2\" && sync \"$2\"' cp $TMP/image.raw $TMP/cp.out   # I1's cp",
            "curl -sS -o $TMP/download.out -H \"X-Auth-Token: $TOKEN\" http://127.0.0.1:$PORT_APPLIANCE/v2/images/$ID/file   # I2; the same from $GLANCE_URL",
            "cp $TMP/image.raw $TMP/download.out   # I2's cp",
            "curl -sS -o /dev/null -H \"X-Auth-Token: $TOKEN\" http://127.0.0.1:$PORT_APPLIANCE/v2/images/$ID/file   # I2 to /dev/null; the same from $GLANCE_URL",
            "md5sum $TMP/image.raw; sha512sum $TMP/image.raw   # once, what the upload's digests cost alone",
            "```", "", END, ""]
    block = "\n".join(out)
    helper.put_section(args.out, START, END, block)
    print(block)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("run")
    for name in ("results", "file", "work", "token", "venv", "setup_log"):
        s.add_argument("--" + name.replace("_", "-"), required=True)
    for name in ("reps", "port", "pid"):
        s.add_argument("--" + name, type=int, required=True)
    s.add_argument("--store", required=True, help="the appliance's region directory")
    s.add_argument("--perf")
    s.set_defaults(func=cmd_run)
    s = sub.add_parser("report")
    s.add_argument("--results", required=True)
    s.add_argument("--setup-log", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_report)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
