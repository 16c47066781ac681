#!/usr/bin/env python3
"""A lab of real OpenStack Glance (and optionally Keystone) services on loopback, for tests.

Run it with the python of the venv made by scripts/openstack-venv.sh (stdlib only here):

    "$(scripts/openstack-venv.sh | tail -n1)/bin/python" tests/openstack/lab.py \
        --dir DIR --glance N [--auth none|keystone] [--token-expiration SECONDS]

Everything (configs, sqlite DBs, image stores, logs) goes under DIR. Each service is a gunicorn
process (one worker, one thread) on a free 127.0.0.1 port, in its own process group. Once all
answer, ONE JSON line describing the lab is printed on stdout (see describe()); then commands
are read from stdin, one per line, each answered with one line on stdout, "ok" or "error: ...":

    stop glance I      SIGTERM the group of Glance I (SIGKILL after 5 s); answers once it is gone
    kill glance I      SIGKILL the group at once (a crash); answers once it is gone
    start glance I     start Glance I again on the same port; answers once it is ready
    stop keystone | kill keystone | start keystone      the same for Keystone
    status             one JSON line: {"glance":[true,false,...], "keystone":true|false|null,
                       "pgids":{"glance":[PGID|null,...], "keystone":PGID|null}} (running or not;
                       the process group of each running service)
    ping               ok

On EOF on stdin, SIGTERM, SIGINT or SIGHUP every process the lab started is killed (whole
process groups; the lab is a child subreaper so orphaned gunicorn workers are reaped too) and it
exits 0. The services also get PR_SET_PDEATHSIG=SIGKILL, so even a SIGKILLed lab leaves nothing.
The lab's own messages go to DIR/lab.log (and fatal errors also to stderr); nothing but the JSON
and the answers is ever written to stdout. A setup failure exits 1 with nothing on stdout.

The JSON line (keystone is null with --auth none):

    {"dir": DIR, "auth": "none"|"keystone", "pid": LAB_PID, "lab_log": DIR/lab.log,
     "startup_seconds": 3.4,
     "glance": [{"url": "http://127.0.0.1:PORT", "port": PORT, "region": "glance0",
                 "store_dir": DIR/glance-0/images (the image files, named by image id),
                 "config_dir": ..., "db": ..., "log": DIR/glance-0/glance.log}, ...],
     "keystone": {"url": "http://127.0.0.1:PORT/v3" (the identity v3 root),
                  "base_url": "http://127.0.0.1:PORT", "port": PORT, "token_expiration": 3600,
                  "admin": {"username": "admin", "password", "project": "admin",
                            "user_domain": "Default", "project_domain": "Default",
                            "project_id", "user_id"},
                  "service": {"username": "replicator", "password", "project": "service",
                              "user_domain": "Default", "project_domain": "Default",
                              "role": "admin", "project_id", "user_id"},
                  "projects": {"alpha": {"id", "user": "alpha-user", "password", "user_id"},
                               "beta": {"id", "user": "beta-user", "password", "user_id"}},
                  "gamma": {"user": "gamma-user", "password", "user_id",
                            "projects": ["alpha", "beta"]},
                  "log": DIR/keystone/keystone.log}}

Glance (33.0.0): filesystem store, sqlite, image import not used (plain PUT .../file), default
sha512 os_hash_algo, Range downloads, format checks (bytes that do not match disk_format: 415).
--auth none: the unauthenticated context is made admin by policy, the owner comes from the
request body. --auth keystone: keystonemiddleware authtoken (token cache off by default, so
revocation and expiry show at once; an unreachable Keystone makes Glance answer 401) and Glance's
default policy: "replicator" (admin on "service") may create images with any owner, sees and
deletes every image; alpha-user/beta-user have "member" on their project, gamma-user on both.
Keystone (30.0.0): fernet tokens, sqlite, in-process cache; the catalog lists each Glance as
service type "image" in region glanceI. Empty migrated DBs (Keystone's bootstrapped, with its
admin password) are cached in <venv>/lab-cache, so only a venv's first lab pays the migrations.
"""

import argparse
import base64
import ctypes
import importlib.metadata
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
READY_TIMEOUT = 90.0
STOP_GRACE = 5.0
# Bump when the way the cached empty DBs are made changes.
TEMPLATE_VERSION = "t2"

_libc = ctypes.CDLL(None, use_errno=True)
# Loopback only: never go through a proxy from the environment.
_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_log_file = None


def log(msg):
    line = time.strftime("%H:%M:%S ") + msg + "\n"
    if _log_file is not None:
        _log_file.write(line)
        _log_file.flush()


def fatal_note(msg):
    log(msg)
    sys.stderr.write("lab.py: " + msg + "\n")
    sys.stderr.flush()


class Stop(Exception):
    """Raised by the signal handler: tear everything down and exit 0."""


class LabError(Exception):
    pass


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port_free(port, timeout=15.0):
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise LabError(f"port {port} is still in use by another process")
        time.sleep(0.1)


def _child_setup(parent_pid):
    # Runs in the child between fork and exec (after setsid): die with the lab.
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


def spawn(argv, log_path, env=None, cwd=None):
    """Starts argv in a new session (its own process group) with output appended to log_path."""
    parent = os.getpid()
    with open(log_path, "ab") as out:
        out.write(("\n==== %s %s\n" % (time.strftime("%Y-%m-%d %H:%M:%S"), " ".join(argv))).encode())
        out.flush()
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
            cwd=cwd, start_new_session=True, close_fds=True,
            preexec_fn=lambda: _child_setup(parent))


def _reap_group(pgid):
    while True:
        try:
            pid, _ = os.waitpid(-pgid, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _group_alive(pgid):
    _reap_group(pgid)
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def kill_group(proc, hard=False, grace=STOP_GRACE):
    """Signals proc's whole process group and waits until every member is gone (and reaped)."""
    if proc is None:
        return
    pgid = proc.pid  # start_new_session: the leader's pid is the group id
    sig = signal.SIGKILL if hard else signal.SIGTERM
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace
    killed = hard
    while _group_alive(pgid):
        if not killed and time.monotonic() > deadline:
            log(f"process group {pgid} still alive {grace} s after SIGTERM: SIGKILL")
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            killed = True
        time.sleep(0.02)
    try:
        proc.wait(timeout=1)
    except (subprocess.TimeoutExpired, ChildProcessError):
        pass


class Job:
    """A setup command running in its own process group; killed by the teardown if still alive."""

    def __init__(self, what, argv, log_path, env=None):
        self.what, self.log_path = what, log_path
        self.proc = spawn(argv, log_path, env=env)

    def wait(self):
        if self.proc.wait() != 0:
            raise LabError(f"{self.what} exited {self.proc.returncode}; see {self.log_path}")

    def kill(self):
        if self.proc.poll() is None:
            kill_group(self.proc, hard=True)


def http(method, url, body=None, headers=None, timeout=30.0):
    """Returns (status, headers, parsed JSON or None)."""
    data = None
    hdrs = dict(headers or {})
    if body is not None:
        data = json.dumps(body).encode()
        hdrs["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with _http.open(req, timeout=timeout) as resp:
            raw = resp.read()
            status, rh = resp.status, resp.headers
    except urllib.error.HTTPError as e:
        raw = e.read()
        status, rh = e.code, e.headers
    try:
        parsed = json.loads(raw) if raw else None
    except ValueError:
        parsed = None
    return status, rh, parsed


class Service:
    """A gunicorn-served WSGI app on a fixed loopback port, restartable."""

    def __init__(self, name, port, argv, env, cwd, log_path, ready_url):
        self.name, self.port, self.argv, self.env = name, port, argv, env
        self.cwd, self.log_path, self.ready_url = cwd, log_path, ready_url
        self.proc = None

    def start(self):
        if self.proc is not None:
            raise LabError(f"{self.name} is already running")
        wait_port_free(self.port)
        self.proc = spawn(self.argv, self.log_path, env=self.env, cwd=self.cwd)
        log(f"started {self.name} pid {self.proc.pid} on port {self.port}")

    def wait_ready(self):
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                self.stop(hard=True)
                raise LabError(f"{self.name} exited ({code}) before answering; see {self.log_path}")
            try:
                with _http.open(self.ready_url, timeout=5) as resp:
                    resp.read()
                    log(f"{self.name} ready ({resp.status})")
                    return
            except urllib.error.HTTPError as e:
                log(f"{self.name} ready ({e.code})")
                return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop(hard=True)
                raise LabError(f"{self.name} not ready after {READY_TIMEOUT} s; see {self.log_path}")
            time.sleep(0.1)

    def stop(self, hard=False):
        if self.proc is None:
            return
        kill_group(self.proc, hard=hard)
        log(f"{'killed' if hard else 'stopped'} {self.name}")
        self.proc = None

    def running(self):
        return self.proc is not None and self.proc.poll() is None


def gunicorn_argv(venv_bin, port, app, threads, chdir=None):
    argv = [os.path.join(venv_bin, "gunicorn"),
            "--bind", f"127.0.0.1:{port}",
            "--workers", "1", "--worker-class", "gthread", "--threads", str(threads),
            # Two instances would otherwise share (and fight over) one control socket.
            "--no-control-socket",
            "--timeout", "300", "--graceful-timeout", "3", "--keep-alive", "5",
            "--access-logfile", "-",
            "--access-logformat", '%(h)s "%(r)s" %(s)s %(B)s %(M)sms',
            "--log-level", "info"]
    if chdir:
        argv += ["--chdir", chdir]
    return argv + [app]


def publish(src, dest):
    """Copies src to dest atomically (concurrent labs may race; every copy is complete)."""
    tmp = f"{dest}.{os.getpid()}.tmp"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


def main():
    global _log_file
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", required=True, help="directory for everything of the lab")
    ap.add_argument("--glance", type=int, default=1,
                    help="number of Glance instances (0: Keystone alone, with --auth keystone)")
    ap.add_argument("--auth", choices=["none", "keystone"], default="none")
    ap.add_argument("--token-expiration", type=int, default=3600,
                    help="Keystone token lifetime in seconds (keystone mode)")
    ap.add_argument("--token-cache-time", type=int, default=-1,
                    help="Glance's keystonemiddleware token cache in seconds; -1 (default) "
                         "disables it so revocations and expiry are seen at once")
    ap.add_argument("--glance-threads", type=int, default=1,
                    help="gunicorn threads per Glance (more than 1 gives sqlite lock errors)")
    ap.add_argument("--debug", action="store_true", help="debug logging in the services")
    args = ap.parse_args()
    if args.glance < 0 or (args.glance == 0 and args.auth == "none"):
        ap.error("--glance must be at least 1 (0 only with --auth keystone)")

    base = os.path.abspath(args.dir)
    os.makedirs(base, exist_ok=True)
    _log_file = open(os.path.join(base, "lab.log"), "a")
    venv = sys.prefix
    venv_bin = os.path.join(venv, "bin")
    for tool in ("gunicorn", "glance-manage", "keystone-manage"):
        if not os.access(os.path.join(venv_bin, tool), os.X_OK):
            fatal_note(f"{venv_bin}/{tool} is missing: run lab.py with the python of the venv "
                       "made by scripts/openstack-venv.sh")
            return 2

    # Orphaned gunicorn workers are re-parented to us, so we can reap them and know they are gone.
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)

    lab = Lab(args, base, venv, venv_bin)

    def on_signal(signum, _frame):
        raise Stop()

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, on_signal)

    code = 0
    try:
        t0 = time.monotonic()
        log(f"lab starting: {' '.join(sys.argv[1:])}")
        lab.setup()
        info = lab.describe()
        info["startup_seconds"] = round(time.monotonic() - t0, 2)
        log(f"lab ready in {info['startup_seconds']} s")
        reply(json.dumps(info))
        while True:
            line = sys.stdin.readline()
            if not line:
                log("EOF on stdin")
                break
            line = line.strip()
            if not line:
                continue
            log(f"command: {line}")
            try:
                answer = lab.command(line)
            except LabError as e:
                answer = f"error: {e}"
            log(f"answer: {answer}")
            reply(answer)
    except Stop:
        log("signal: stopping")
    except BrokenPipeError:
        log("stdout closed: stopping")
    except LabError as e:
        fatal_note(str(e))
        code = 1
    except Exception as e:  # keep the teardown below for any bug too
        fatal_note(f"unexpected {type(e).__name__}: {e}")
        code = 1
    finally:
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        lab.teardown()
        log("all processes gone; exit")
    return code


def reply(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class Lab:
    def __init__(self, args, base, venv, venv_bin):
        self.args, self.base, self.venv, self.venv_bin = args, base, venv, venv_bin
        self.glances = []
        self.glance_info = []
        self.keystone = None
        self.keystone_info = None
        self.jobs = []
        self.cache_dir = os.path.join(venv, "lab-cache")
        os.makedirs(self.cache_dir, exist_ok=True)

    # ---- setup -------------------------------------------------------------------------------

    def setup(self):
        keystone_mode = self.args.auth == "keystone"
        kport = free_port() if keystone_mode else None
        ports = []
        while len(ports) < self.args.glance:
            p = free_port()
            if p != kport and p not in ports:
                ports.append(p)

        if keystone_mode:
            kdir = os.path.join(self.base, "keystone")
            self.keystone_info = self._keystone_files(kdir, kport)
        gdirs = [os.path.join(self.base, f"glance-{i}") for i in range(self.args.glance)]
        for i, gdir in enumerate(gdirs):
            self._glance_files(i, gdir, ports[i], kport)
        # Everything here is CPU-bound (imports, migrations) on few cores, so: the migrated empty
        # Glance DB and the migrated + bootstrapped Keystone DB are cached in the venv
        # (_template) after the first lab made them; without them, one Glance db_sync (copied to
        # every instance) runs next to Keystone's db_sync + bootstrap, and each service starts as
        # soon as its DB is there.
        g0 = gdirs[0] if gdirs else None
        gtemplate = self._template("glance")
        gjob = kjob = None
        if g0 is None:
            pass  # Keystone alone
        elif os.path.exists(gtemplate):
            log(f"glance DB from {gtemplate}")
            shutil.copyfile(gtemplate, os.path.join(g0, "glance.sqlite"))
        else:
            gjob = Job("glance-manage db_sync",
                       [os.path.join(self.venv_bin, "glance-manage"), "--config-dir",
                        os.path.join(g0, "etc"), "db_sync"], os.path.join(g0, "setup.log"))
            self.jobs.append(gjob)
        if keystone_mode:
            kjob = self._keystone_db()
        if gjob is not None:
            gjob.wait()
            publish(os.path.join(g0, "glance.sqlite"), gtemplate)
        for gdir in gdirs[1:]:
            shutil.copyfile(os.path.join(g0, "glance.sqlite"), os.path.join(gdir, "glance.sqlite"))
        for svc in self.glances:
            svc.start()
        if keystone_mode:
            if kjob is not None:
                kjob.wait()
                self._publish_keystone_template()
            self.keystone.start()
        for svc in self.glances + ([self.keystone] if keystone_mode else []):
            svc.wait_ready()
        if keystone_mode:
            self._keystone_populate()

    def _glance_files(self, i, gdir, port, kport):
        etc = os.path.join(gdir, "etc")
        for d in (etc, os.path.join(gdir, "images"), os.path.join(gdir, "staging"),
                  os.path.join(gdir, "tasks")):
            os.makedirs(d, exist_ok=True)
        with open(os.path.join(self.venv, "etc", "glance", "glance-api-paste.ini")) as f:
            paste = f.read()
        write(os.path.join(etc, "glance-api-paste.ini"),
              paste.replace("/etc/glance/healthcheck_disable",
                            os.path.join(gdir, "healthcheck_disable")))
        keystone = kport is not None
        conf = f"""# written by tests/openstack/lab.py
[DEFAULT]
debug = {str(self.args.debug).lower()}
use_stderr = true
enabled_backends = fs:file
# Defaults kept on purpose: show_multiple_locations (False), show_image_direct_url (False),
# hashing_algorithm (sha512, so records carry os_hash_value), image_size_cap.

[database]
connection = sqlite:///{gdir}/glance.sqlite

[glance_store]
default_backend = fs

[fs]
filesystem_store_datadir = {gdir}/images

[os_glance_staging_store]
filesystem_store_datadir = {gdir}/staging

[os_glance_tasks_store]
filesystem_store_datadir = {gdir}/tasks

[paste_deploy]
config_file = {etc}/glance-api-paste.ini
flavor = {"keystone" if keystone else ""}

[oslo_policy]
policy_file = {etc}/policy.yaml

[oslo_concurrency]
lock_path = {gdir}/locks
"""
        if keystone:
            k = self.keystone_info
            conf += f"""
[keystone_authtoken]
www_authenticate_uri = http://127.0.0.1:{kport}/v3
auth_url = http://127.0.0.1:{kport}/v3
auth_type = password
username = {k['_glance_user']}
password = {k['_glance_password']}
project_name = service
user_domain_name = Default
project_domain_name = Default
interface = public
token_cache_time = {self.args.token_cache_time}
"""
            # Keystone mode: Glance's own default policy (role:admin is context_is_admin).
            policy = "{}\n"
        else:
            # No auth: every request gets the unauthenticated context with no roles; make it admin
            # (otherwise everything is 403). The owner is then whatever the request body says.
            policy = '"context_is_admin": ""\n'
        write(os.path.join(etc, "glance-api.conf"), conf)
        write(os.path.join(etc, "policy.yaml"), policy)
        env = dict(os.environ, OS_GLANCE_CONFIG_DIR=etc)
        log_path = os.path.join(gdir, "glance.log")
        svc = Service(f"glance {i}", port,
                      gunicorn_argv(self.venv_bin, port, "glance.wsgi.api:application",
                                    self.args.glance_threads),
                      env, gdir, log_path, f"http://127.0.0.1:{port}/healthcheck")
        self.glances.append(svc)
        self.glance_info.append({
            "url": f"http://127.0.0.1:{port}",
            "port": port,
            "region": f"glance{i}",
            "store_dir": os.path.join(gdir, "images"),
            "config_dir": etc,
            "db": os.path.join(gdir, "glance.sqlite"),
            "log": log_path,
        })

    def _keystone_files(self, kdir, kport):
        etc = os.path.join(kdir, "etc")
        app = os.path.join(kdir, "app")
        for d in (etc, app, os.path.join(kdir, "fernet-keys"), os.path.join(kdir, "credential-keys")):
            os.makedirs(d, exist_ok=True)
        self.kdir, self.kport, self.ketc = kdir, kport, etc
        write(os.path.join(etc, "keystone.conf"), f"""# written by tests/openstack/lab.py
[DEFAULT]
debug = {str(self.args.debug).lower()}
use_stderr = true

[database]
connection = sqlite:///{kdir}/keystone.sqlite

[token]
provider = fernet
expiration = {self.args.token_expiration}

[fernet_tokens]
key_repository = {kdir}/fernet-keys

[fernet_receipts]
key_repository = {kdir}/fernet-keys

[credential]
key_repository = {kdir}/credential-keys

[identity]
# bcrypt's minimum cost: authentication in milliseconds instead of a quarter of a second.
password_hash_rounds = 4

[cache]
# In-process cache (one worker, so invalidation is exact). Without it every token validation
# costs ~450 SQL queries and 0.3-0.9 s; with it a few milliseconds.
enabled = true
backend = dogpile.cache.memory
""")
        # Keystone parses sys.argv with oslo.config when the app is loaded: hide gunicorn's.
        write(os.path.join(app, "keystone_lab_wsgi.py"),
              "import sys\nsys.argv = sys.argv[:1]\n"
              "from keystone.wsgi.api import application  # noqa: E402,F401\n")
        # db_sync and bootstrap in one interpreter: each keystone-manage run costs ~4 s of imports.
        write(os.path.join(app, "keystone_lab_setup.py"), """import sys
from keystone.cmd import cli
conf, url = sys.argv[1:3]
cli.main(argv=["keystone-manage", "--config-file", conf, "db_sync"])
cli.CONF.reset()
cli.CONF.clear()
# The admin's password comes from OS_BOOTSTRAP_PASSWORD.
cli.main(argv=["keystone-manage", "--config-file", conf, "bootstrap",
               "--bootstrap-username", "admin", "--bootstrap-project-name", "admin",
               "--bootstrap-role-name", "admin", "--bootstrap-service-name", "keystone",
               "--bootstrap-region-id", "RegionOne", "--bootstrap-public-url", url])
""")
        # What keystone-manage fernet_setup / credential_setup would make: keys 0 (staged) and
        # 1 (primary), 32 random bytes in urlsafe base64, in 0700 directories.
        for repo in ("fernet-keys", "credential-keys"):
            path = os.path.join(kdir, repo)
            os.chmod(path, 0o700)
            for name in ("0", "1"):
                fd = os.open(os.path.join(path, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(base64.urlsafe_b64encode(os.urandom(32)))
        env = dict(os.environ, OS_KEYSTONE_CONFIG_DIR=etc)
        log_path = os.path.join(kdir, "keystone.log")
        self.keystone = Service("keystone", kport,
                                gunicorn_argv(self.venv_bin, kport,
                                              "keystone_lab_wsgi:application", 1, chdir=app),
                                env, kdir, log_path, f"http://127.0.0.1:{kport}/v3")
        pw = lambda: secrets.token_hex(12)  # noqa: E731
        return {
            "url": f"http://127.0.0.1:{kport}/v3",
            "base_url": f"http://127.0.0.1:{kport}",
            "port": kport,
            "token_expiration": self.args.token_expiration,
            "admin": {"username": "admin", "password": pw(), "project": "admin",
                      "user_domain": "Default", "project_domain": "Default"},
            "service": {"username": "replicator", "password": pw(), "project": "service",
                        "user_domain": "Default", "project_domain": "Default", "role": "admin"},
            "projects": {
                "alpha": {"user": "alpha-user", "password": pw()},
                "beta": {"user": "beta-user", "password": pw()},
            },
            "gamma": {"user": "gamma-user", "password": pw(), "projects": ["alpha", "beta"]},
            "log": log_path,
            "_glance_user": "glance",
            "_glance_password": pw(),
        }

    def _template(self, package, directory=False):
        """Where the migrated DB of package is cached (inside the venv: a rebuilt venv starts
        afresh). Written by whichever lab gets there first, with an atomic rename. Keystone's is a
        directory with the bootstrapped DB and the admin's password (shared by the labs made from
        it; the identity endpoint's URL is fixed per lab in _keystone_populate)."""
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        name = f"{package}-{version}-{TEMPLATE_VERSION}"
        return os.path.join(self.cache_dir, name if directory else name + ".sqlite")

    def _keystone_db(self):
        """Copies the cached bootstrapped DB (returns None), or starts making it (returns the
        Job; _publish_keystone_template caches its result)."""
        self.ktemplate = self._template("keystone", directory=True)
        db = os.path.join(self.kdir, "keystone.sqlite")
        try:
            with open(os.path.join(self.ktemplate, "admin-password")) as f:
                password = f.read().strip()
            shutil.copyfile(os.path.join(self.ktemplate, "keystone.sqlite"), db)
            self.keystone_info["admin"]["password"] = password
            log(f"keystone DB from {self.ktemplate}")
            return None
        except FileNotFoundError:
            pass
        # keystone-manage db_sync and bootstrap in one interpreter (each run of keystone-manage
        # costs ~4 s of imports).
        env = dict(os.environ, OS_BOOTSTRAP_PASSWORD=self.keystone_info["admin"]["password"])
        job = Job("keystone db_sync + bootstrap",
                  [os.path.join(self.venv_bin, "python"),
                   os.path.join(self.kdir, "app", "keystone_lab_setup.py"),
                   os.path.join(self.ketc, "keystone.conf"), self.keystone_info["url"]],
                  os.path.join(self.kdir, "setup.log"), env)
        self.jobs.append(job)
        return job

    def _publish_keystone_template(self):
        tmp = f"{self.ktemplate}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp, mode=0o700)
        shutil.copyfile(os.path.join(self.kdir, "keystone.sqlite"), os.path.join(tmp, "keystone.sqlite"))
        fd = os.open(os.path.join(tmp, "admin-password"), os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.keystone_info["admin"]["password"] + "\n")
        try:
            os.rename(tmp, self.ktemplate)
        except OSError:  # another lab published it first: theirs is as good
            shutil.rmtree(tmp, ignore_errors=True)

    def _keystone_populate(self):
        k = self.keystone_info
        url = k["url"]
        status, headers, _ = http("POST", url + "/auth/tokens", {"auth": {
            "identity": {"methods": ["password"], "password": {"user": {
                "name": "admin", "domain": {"id": "default"},
                "password": k["admin"]["password"]}}},
            "scope": {"project": {"name": "admin", "domain": {"id": "default"}}}}})
        if status != 201:
            raise LabError(f"keystone: admin token: HTTP {status}")
        token = headers["X-Subject-Token"]

        def call(method, path, body=None, want=(200, 201, 204)):
            st, _, js = http(method, url + path, body, {"X-Auth-Token": token})
            if st not in want:
                raise LabError(f"keystone: {method} {path}: HTTP {st} {js}")
            return js

        # The bootstrap (perhaps cached from another lab) registered its own URL for identity.
        for svc in call("GET", "/services?type=identity")["services"]:
            for ep in call("GET", f"/endpoints?service_id={svc['id']}")["endpoints"]:
                if ep["url"] != url:
                    call("PATCH", f"/endpoints/{ep['id']}", {"endpoint": {"url": url}})

        roles = {r["name"]: r["id"] for r in call("GET", "/roles")["roles"]}
        for name in ("admin", "member", "reader", "service"):
            if name not in roles:
                roles[name] = call("POST", "/roles", {"role": {"name": name}})["role"]["id"]

        def project(name, description):
            return call("POST", "/projects", {"project": {
                "name": name, "domain_id": "default", "description": description}})["project"]["id"]

        def user(name, password, project_id):
            return call("POST", "/users", {"user": {
                "name": name, "password": password, "domain_id": "default",
                "default_project_id": project_id}})["user"]["id"]

        def grant(project_id, user_id, role):
            call("PUT", f"/projects/{project_id}/users/{user_id}/roles/{roles[role]}")

        service_id = project("service", "service accounts")
        alpha_id = project("alpha", "tenant alpha")
        beta_id = project("beta", "tenant beta")
        admin_project = call("GET", "/projects?name=admin")["projects"][0]["id"]
        admin_user = call("GET", "/users?name=admin")["users"][0]["id"]
        k["admin"]["project_id"] = admin_project
        k["admin"]["user_id"] = admin_user

        k["service"]["project_id"] = service_id
        rid = user("replicator", k["service"]["password"], service_id)
        k["service"]["user_id"] = rid
        grant(service_id, rid, "admin")

        gid = user(k["_glance_user"], k["_glance_password"], service_id)
        grant(service_id, gid, "service")

        for name, pid in (("alpha", alpha_id), ("beta", beta_id)):
            p = k["projects"][name]
            p["id"] = pid
            p["user_id"] = user(p["user"], p["password"], pid)
            grant(pid, p["user_id"], "member")
        g = k["gamma"]
        g["user_id"] = user(g["user"], g["password"], alpha_id)
        grant(alpha_id, g["user_id"], "member")
        grant(beta_id, g["user_id"], "member")

        # A catalog entry per Glance (service type "image", region glanceI, public interface).
        image_service = call("POST", "/services", {"service": {
            "type": "image", "name": "glance", "enabled": True}})["service"]["id"]
        for info in self.glance_info:
            call("POST", "/regions", {"region": {"id": info["region"]}})
            call("POST", "/endpoints", {"endpoint": {
                "service_id": image_service, "interface": "public", "region_id": info["region"],
                "url": info["url"], "enabled": True}})

    # ---- describe / commands -----------------------------------------------------------------

    def describe(self):
        keystone = None
        if self.keystone_info is not None:
            keystone = {k: v for k, v in self.keystone_info.items() if not k.startswith("_")}
        return {"dir": self.base, "auth": self.args.auth, "pid": os.getpid(),
                "lab_log": os.path.join(self.base, "lab.log"),
                "glance": self.glance_info, "keystone": keystone}

    def command(self, line):
        words = line.split()
        if words == ["ping"]:
            return "ok"
        if words == ["status"]:
            def pgid(svc):
                return svc.proc.pid if svc.running() else None
            return json.dumps({"glance": [g.running() for g in self.glances],
                               "keystone": self.keystone.running() if self.keystone else None,
                               "pgids": {"glance": [pgid(g) for g in self.glances],
                                         "keystone": pgid(self.keystone) if self.keystone else None}})
        if len(words) >= 2 and words[0] in ("stop", "kill", "start"):
            verb, what = words[0], words[1]
            if what == "glance" and len(words) == 3:
                try:
                    svc = self.glances[int(words[2])]
                except (ValueError, IndexError):
                    raise LabError(f"no glance {words[2]} (have 0..{len(self.glances) - 1})")
            elif what == "keystone" and len(words) == 2:
                if self.keystone is None:
                    raise LabError("no keystone in this lab (--auth none)")
                svc = self.keystone
            else:
                raise LabError(f"unknown command: {line}")
            if verb == "start":
                if svc.running():
                    raise LabError(f"{svc.name} is already running")
                svc.proc = None  # it may have died by itself
                svc.start()
                svc.wait_ready()
            else:
                svc.stop(hard=(verb == "kill"))
            return "ok"
        raise LabError(f"unknown command: {line}")

    def teardown(self):
        for job in self.jobs:
            job.kill()
        for svc in list(self.glances) + ([self.keystone] if self.keystone else []):
            try:
                svc.stop(hard=True)
            except Exception as e:  # go on with the others
                log(f"teardown of {svc.name}: {e}")


if __name__ == "__main__":
    sys.exit(main())
