#!/usr/bin/env python3
"""G1: Glance→Glance copy through the appliance's API vs a plain curl pipe between the same
two Glances, side by side in one run.

    python3 scripts/bench/glance.py [--mib 256] [--reps 3] [--binary target/release/image-replicator]

Starts two no-auth Glances with tests/openstack/lab.py (venv from scripts/openstack-venv.sh),
sets up an appliance data dir through the CLI, uploads one qcow2 image of about --mib MiB of
random data into Glance 0, starts `serve`, and then per rep, in alternating order:
  curl:  POST an image record to Glance 1, then `curl GET Glance0/file | curl -T - PUT Glance1/file`
  ours:  POST /jobs and poll GET /jobs/{id} every 20 ms until `replicated`
Each destination image is deleted after its rep. Prints one JSON line with every time and the
median ratio ours / curl. Everything it starts is stopped and its temp dir removed at exit.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TENANT_A = "1b0e5c9a2f3d4e6b8a7c0d1e2f3a4b5c"
TENANT_B = "2c1f6d0b3a4e5f7c9b8d1e2f3a4b5c6d"
TENANT_D = "3d2a7e1c4b5f6a8d0c9e2f3a4b5c6d7e"
JOBS = "/v2/extension/image_replicator/jobs"
http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def call(method, url, body=None, headers=None, data=None):
    headers = dict(headers or {})
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    with http.open(req, timeout=600) as resp:
        text = resp.read()
        return resp.status, (json.loads(text) if text.strip() else None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/image-replicator"))
    ap.add_argument("--diagnose", action="store_true",
                    help="also time curl's download alone and uploads with and without a length")
    ap.add_argument("--server-log", help="keep the server's log (debug level) in this file")
    args = ap.parse_args()

    venv = subprocess.run(["bash", os.path.join(ROOT, "scripts/openstack-venv.sh")], check=True,
                          capture_output=True, text=True).stdout.strip().splitlines()[-1]
    tmp = tempfile.TemporaryDirectory(prefix="bench-glance.")
    procs = []
    try:
        lab = subprocess.Popen([os.path.join(venv, "bin/python"),
                                os.path.join(ROOT, "tests/openstack/lab.py"),
                                "--dir", os.path.join(tmp.name, "lab"), "--glance", "2"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(lab)
        info = json.loads(lab.stdout.readline())
        g0, g1 = info["glance"][0]["url"], info["glance"][1]["url"]

        data_dir = os.path.join(tmp.name, "data")
        cli = lambda *a: subprocess.run([args.binary, "--data-dir", data_dir, *a], check=True,
                                        capture_output=True, text=True).stdout.strip()
        cli("region", "add", "g0", "--glance-url", g0)
        cli("region", "add", "g1", "--glance-url", g1)
        cli("tenant", "add", TENANT_A, "--region", "g0")
        cli("tenant", "add", TENANT_B, "--region", "g1")
        cli("region", "add", "d")
        cli("tenant", "add", TENANT_D, "--region", "d")
        cli("user", "add", "bench", "--tenant", TENANT_A, "--tenant", TENANT_B, "--tenant", TENANT_D)
        token_d = cli("token", "issue", "--user", "bench", "--tenant", TENANT_D)
        token = cli("token", "issue", "--user", "bench", "--tenant", TENANT_A)

        raw = os.path.join(tmp.name, "src.raw")
        qcow = os.path.join(tmp.name, "src.qcow2")
        with open(raw, "wb") as f:
            for _ in range(args.mib):
                f.write(os.urandom(1 << 20))
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow], check=True)
        os.remove(raw)
        size = os.path.getsize(qcow)
        in_dir = cli("image", "import", qcow, "--tenant", TENANT_D, "--name", "bench",
                     "--disk-format", "qcow2")
        meta = {"name": "bench", "disk_format": "qcow2", "container_format": "bare"}
        _, src = call("POST", g0 + "/v2/images", {**meta, "owner": TENANT_A})
        subprocess.run(["curl", "-sSf", "-X", "PUT", "-H", "Content-Type: application/octet-stream",
                        "-T", qcow, f"{g0}/v2/images/{src['id']}/file"], check=True)

        log = open(args.server_log, "w") if args.server_log else subprocess.DEVNULL
        serve = subprocess.Popen([args.binary, "--data-dir", data_dir, "serve", "--listen",
                                  "127.0.0.1:0", "--log-level",
                                  "debug" if args.server_log else "info"],
                                 stdout=subprocess.PIPE, stderr=log, text=True)
        procs.append(serve)
        base = None
        for line in serve.stdout:
            if line.startswith("image-replicator listening on "):
                base = line.split()[-1]
                break
        if base is None:
            sys.exit("the server did not start")

        def curl_pipe():
            _, dst = call("POST", g1 + "/v2/images", {**meta, "owner": TENANT_B})
            start = time.monotonic()
            down = subprocess.Popen(["curl", "-sSf", f"{g0}/v2/images/{src['id']}/file"],
                                    stdout=subprocess.PIPE)
            up = subprocess.run(["curl", "-sSf", "-X", "PUT", "-H",
                                 "Content-Type: application/octet-stream", "-T", "-",
                                 f"{g1}/v2/images/{dst['id']}/file"], stdin=down.stdout)
            down.stdout.close()
            down.wait()
            took = time.monotonic() - start
            if up.returncode or down.returncode:
                sys.exit("the curl pipe failed")
            call("DELETE", f"{g1}/v2/images/{dst['id']}")
            return took

        def cpu():
            with open(f"/proc/{serve.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        server_cpu = []

        def ours(image=None, to=TENANT_B, tok=None):
            image, tok = image or src["id"], tok or token
            cpu_before = cpu()
            start = time.monotonic()
            _, job = call("POST", base + JOBS, {"image_id": image, "tenant_id_dst": to},
                          {"X-Auth-Token": tok})
            while True:
                _, shown = call("GET", f"{base}{JOBS}/{job['job_id']}", headers={"X-Auth-Token": tok})
                if shown["status"] in ("replicated", "error", "canceled"):
                    break
                time.sleep(0.02)
            took = time.monotonic() - start
            server_cpu.append(cpu() - cpu_before)
            if shown["status"] != "replicated":
                sys.exit(f"our copy ended {shown['status']}")
            if to == TENANT_B:
                call("DELETE", f"{g1}/v2/images/{shown['destination_image_id']}")
            else:
                cli("image", "delete", shown["destination_image_id"])
            return took

        diagnosis = {}
        if args.diagnose:
            def timed(name, cmd, **kw):
                start = time.monotonic()
                subprocess.run(cmd, check=True, **kw)
                diagnosis[name] = time.monotonic() - start

            timed("curl_download_s", ["curl", "-sSf", "-o", "/dev/null",
                                       f"{g0}/v2/images/{src['id']}/file"])
            for name, how in (("curl_upload_length_s", ["-T", qcow]),
                              ("curl_upload_chunked_s", ["-T", "-"])):
                _, dst = call("POST", g1 + "/v2/images", {**meta, "owner": TENANT_B})
                with open(qcow, "rb") as f:
                    timed(name, ["curl", "-sSf", "-X", "PUT", "-H",
                                 "Content-Type: application/octet-stream", *how,
                                 f"{g1}/v2/images/{dst['id']}/file"], stdin=f)
                call("DELETE", f"{g1}/v2/images/{dst['id']}")
            diagnosis["ours_glance_to_dir_s"] = ours(to=TENANT_D)
            diagnosis["ours_dir_to_glance_s"] = ours(image=in_dir, tok=token_d)

        times = {"curl": [], "ours": []}
        for rep in range(args.reps):
            order = [("curl", curl_pipe), ("ours", ours)]
            if rep % 2:
                order.reverse()
            for name, fn in order:
                times[name].append(fn())
        ratios = [o / c for o, c in zip(times["ours"], times["curl"])]
        print(json.dumps({"bytes": size, "reps": args.reps, "curl_s": times["curl"],
                          "ours_s": times["ours"], "server_cpu_s": server_cpu, "ratios": ratios,
                          "median_ratio": statistics.median(ratios), **diagnosis}))
    finally:
        for p in reversed(procs):
            if p.stdin:
                p.stdin.close()
            else:
                p.terminate()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        tmp.cleanup()


if __name__ == "__main__":
    main()
