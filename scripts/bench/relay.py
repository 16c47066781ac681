#!/usr/bin/env python3
"""A counting TCP relay for scripts/bench.sh's peer figures (D1-D4). Standard library only.

    relay.py --target 127.0.0.1:PORT --ports-file FILE [--rate BYTES_PER_SECOND]

Listens on 127.0.0.1 (any free port) and relays every connection to the target, counting the
bytes each way: "up" from the client to the target, "down" back. With --rate (or the control
command `rate N`), each direction is limited to N bytes a second over all its connections (a
token bucket of 1/20 s: a thin link); 0 means no limit.

Its ports go to --ports-file as one JSON line, {"relay": P, "control": Q}, once it listens. The
control port answers one command per connection, a line, with a JSON line:
    stats        {"up": ..., "down": ..., "connections": ..., "active": ..., "rate": ...}
    rate N       the same, after setting the limit to N bytes a second
It runs until SIGTERM or SIGINT. Threads, not asyncio: each direction of each connection is
one thread blocked in recv_into/sendall, which release the GIL, so loopback throughput is not
bounded by one core's Python loop.
"""

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time

BUFFER = 1024 * 1024


class Bucket:
    """A token bucket shared by one direction's connections; rate 0 = unlimited."""

    def __init__(self, rate):
        self.lock = threading.Lock()
        self.rate = rate
        self.tokens = 0.0
        self.stamp = time.monotonic()

    def set_rate(self, rate):
        with self.lock:
            self.rate = rate
            self.tokens = 0.0
            self.stamp = time.monotonic()

    def take(self, n):
        """Waits until n bytes may pass."""
        while True:
            with self.lock:
                rate = self.rate
                if rate <= 0:
                    return
                now = time.monotonic()
                self.tokens = min(rate / 20, self.tokens + (now - self.stamp) * rate)
                self.stamp = now
                self.tokens -= n
                wait = -self.tokens / rate if self.tokens < 0 else 0.0
            # The debt is paid by sleeping; the next caller sees the bucket below zero.
            if wait > 0:
                time.sleep(wait)
            return

    def chunk(self):
        """How much to read at once: about a 1/50 s of the rate when limited."""
        rate = self.rate
        if rate <= 0:
            return BUFFER
        return max(4096, min(BUFFER, int(rate / 50)))


class Relay:
    def __init__(self, target, rate):
        self.target = target
        self.lock = threading.Lock()
        self.counts = {"up": 0, "down": 0, "connections": 0, "active": 0}
        self.buckets = {"up": Bucket(rate), "down": Bucket(rate)}

    def stats(self):
        with self.lock:
            out = dict(self.counts)
        out["rate"] = self.buckets["up"].rate
        return out

    def add(self, key, n):
        with self.lock:
            self.counts[key] += n

    def pump(self, src, dst, direction, done):
        bucket = self.buckets[direction]
        buf = bytearray(BUFFER)
        view = memoryview(buf)
        try:
            while True:
                n = src.recv_into(view[:bucket.chunk()])
                if n == 0:
                    break
                bucket.take(n)
                dst.sendall(view[:n])
                self.add(direction, n)
        except OSError:
            pass
        finally:
            # Half-close the other side so that a response after the request's end still flows;
            # the second pump to finish closes both.
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            if done.acquire(blocking=False):
                return
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass
            self.add("active", -1)

    def serve_client(self, client):
        try:
            upstream = socket.create_connection(self.target)
        except OSError:
            client.close()
            return
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.lock:
            self.counts["connections"] += 1
            self.counts["active"] += 1
        done = threading.Semaphore(1)
        threading.Thread(target=self.pump, args=(client, upstream, "up", done), daemon=True).start()
        threading.Thread(target=self.pump, args=(upstream, client, "down", done), daemon=True).start()

    def accept_loop(self, listener):
        while True:
            client, _ = listener.accept()
            self.serve_client(client)

    def control_loop(self, listener):
        while True:
            conn, _ = listener.accept()
            with conn:
                try:
                    line = conn.makefile("r").readline().split()
                    if line[:1] == ["rate"] and len(line) == 2:
                        rate = int(line[1])
                        for bucket in self.buckets.values():
                            bucket.set_rate(rate)
                    elif line[:1] != ["stats"]:
                        conn.sendall(b'{"error": "commands: stats, rate N"}\n')
                        continue
                    conn.sendall((json.dumps(self.stats()) + "\n").encode())
                except (OSError, ValueError):
                    pass


def listen():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(128)
    return s


def control(port, command):
    """Sends one command to a relay's control port; its answer as a dict."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall((command + "\n").encode())
        return json.loads(s.makefile("r").readline())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--target", help="HOST:PORT to relay to")
    p.add_argument("--ports-file", help="where the ports go (JSON)")
    p.add_argument("--rate", type=int, default=0, help="bytes per second each way (0: no limit)")
    p.add_argument("--ask", nargs=2, metavar=("CONTROL_PORT", "COMMAND"),
                   help="send COMMAND to a running relay's control port and print the answer")
    args = p.parse_args()
    if args.ask:
        print(json.dumps(control(int(args.ask[0]), args.ask[1])))
        return
    if not args.target or not args.ports_file:
        p.error("--target and --ports-file are needed")
    host, _, port = args.target.rpartition(":")
    relay = Relay((host, int(port)), args.rate)
    data, ctl = listen(), listen()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.signal(signal.SIGINT, lambda *_: os._exit(0))
    threading.Thread(target=relay.control_loop, args=(ctl,), daemon=True).start()
    tmp = args.ports_file + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps({"relay": data.getsockname()[1], "control": ctl.getsockname()[1]}) + "\n")
    os.replace(tmp, args.ports_file)
    try:
        relay.accept_loop(data)
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
