#!/usr/bin/env python3
"""Management-plane measurements (BENCHMARKS.md, "Management plane"):

1. Time from an admin change to a gateway serving it, over CHANGES changes (default 20), with
   long-poll (long_poll_s = 30) and with plain polling (long_poll_s = 0, the default
   poll_interval_ms = 10000; each change is made at a random point of the poll cycle).
2. Cold start from each backup store (fs, sqlite, redis) with a 1,000-API configuration: time
   from starting the process to /readyz answering 200 with configSource "backup".

Needs target/release/outpost and the store plugins (cargo build --release -p outpost
-p outpost-store-fs -p outpost-store-sqlite -p outpost-store-redis) and redis-server.
Every port comes from the OS; every process started is stopped at exit.
"""
import json, os, socket, statistics, subprocess, sys, tempfile, threading, time, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("OUTPOST_BIN", os.path.join(ROOT, "target/release/outpost"))
LIBS = os.path.dirname(BIN)
CHANGES = int(os.environ.get("CHANGES", "20"))
STARTS = int(os.environ.get("STARTS", "5"))
TOKEN = "bench-admin-token-0123456789"
procs = []


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


def spawn(args, **kw):
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
    procs.append(p)
    return p


def wait_line(p, message, timeout=30):
    """The first JSON log line with this message."""
    box = {}
    def read():
        for line in p.stdout:
            try:
                v = json.loads(line)
            except ValueError:
                continue
            if v.get("message") == message:
                box["v"] = v
                return
    t = threading.Thread(target=read, daemon=True); t.start(); t.join(timeout)
    if "v" not in box:
        sys.exit(f"no '{message}' log from {p.args}")
    threading.Thread(target=lambda: [None for _ in p.stdout], daemon=True).start()
    return box["v"]


def http(method, url, body=None, token=None):
    req = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode())
    req.add_header("content-type", "application/json")
    if token:
        req.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def gateway(tmp, name, config_toml, extra=""):
    port = free_port()
    d = os.path.join(tmp, name); os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "outpost.toml"), "w") as f:
        f.write(f"[runtime]\nplugin_dir = \"{LIBS}\"\n\n[log]\nformat = \"json\"\nlevel = \"info\"\n\n"
                f"[[listeners]]\nname = \"http\"\naddress = \"127.0.0.1:{port}\"\n\n{extra}\n{config_toml}")
    return d, port


def summary(xs):
    return f"median {statistics.median(xs):.0f} ms, max {max(xs):.0f} ms (n={len(xs)})"


def change_latency(tmp, long_poll_s):
    d = os.path.join(tmp, f"plane-{long_poll_s}"); os.makedirs(d)
    open(os.path.join(d, "admin.token"), "w").write(TOKEN)
    open(os.path.join(d, "control.toml"), "w").write(
        "[control]\nlisten = \"127.0.0.1:0\"\ndatabase = \"state.db\"\nadmin_token_file = \"admin.token\"\nsigning_key_file = \"signing.key\"\n")
    plane = spawn([BIN, "control", "--manifest", os.path.join(d, "control.toml")])
    v = wait_line(plane, "Listening.")
    base = f"http://{v['address']}/admin/v1"
    closed = free_port()
    http("PUT", f"{base}/backends/b", {"urls": [f"http://127.0.0.1:{closed}"]}, TOKEN)
    api = lambda path: {"path": path, "backend": "b", "subscription_required": False,
                        "operations": [{"id": "any", "method": "*", "url_template": "/*"}]}
    http("PUT", f"{base}/apis/svc", api("/p0"), TOKEN)
    http("PUT", f"{base}/gateways/gw", {"apis": ["svc"]}, TOKEN)
    _, t = http("POST", f"{base}/gateways/gw/tokens", None, TOKEN)
    token = json.loads(t)["token"]
    gd, port = gateway(tmp, f"gw-{long_poll_s}",
                       f"[config]\ntype = \"plane\"\nurl = \"http://{v['address']}\"\ntoken = \"{token}\"\n"
                       f"public_key = \"{v['public_key']}\"\nlong_poll_s = {long_poll_s}\n")
    gw = spawn([BIN, "run", "--manifest", os.path.join(gd, "outpost.toml")])
    wait_line(gw, "Listening.")
    times = []
    import random
    for i in range(1, CHANGES + 1):
        if long_poll_s == 0:
            # Changes land at random points of the poll cycle, as admins' do.
            time.sleep(random.uniform(0, 10))
        http("PUT", f"{base}/apis/svc", api(f"/p{i}"), TOKEN)
        start = time.monotonic()
        while http("GET", f"http://127.0.0.1:{port}/p{i}/x")[0] == 404:
            time.sleep(0.002)
        times.append((time.monotonic() - start) * 1000)
    for p in (gw, plane):
        p.kill(); p.wait()
    return times


def cold_start(tmp, store):
    apis = [{"id": f"a{i}", "path": f"/a{i}", "backend": "b", "subscription_required": False,
             "operations": [{"id": "any", "method": "*", "url_template": "/*"}]} for i in range(1000)]
    doc = {"version": "big", "backends": [{"id": "b", "urls": ["http://127.0.0.1:9"]}], "apis": apis}
    redis = None
    if store == "fs":
        cfg = f"config = {{ dir = \"{tmp}/fs-backup\" }}"
    elif store == "sqlite":
        cfg = f"config = {{ path = \"{tmp}/backup.db\" }}"
    else:
        rport = free_port()
        redis = spawn(["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        time.sleep(0.5)
        cfg = f"config = {{ url = \"redis://127.0.0.1:{rport}/0\" }}"
    extra = f"[[plugins]]\nname = \"store\"\nlibrary = \"outpost_store_{store}\"\n\n[backup]\nstore = \"{store}\"\n{cfg}\n"
    gd, port = gateway(tmp, f"cold-{store}", "[config]\ntype = \"file\"\npath = \"api.json\"\n", extra)
    api_path = os.path.join(gd, "api.json")
    json.dump(doc, open(api_path, "w"))
    gw = spawn([BIN, "run", "--manifest", os.path.join(gd, "outpost.toml")])
    wait_line(gw, "Configuration backed up.")
    gw.kill(); gw.wait()
    open(api_path, "w").write("{ broken")
    times = []
    for _ in range(STARTS):
        start = time.monotonic()
        gw = spawn([BIN, "run", "--manifest", os.path.join(gd, "outpost.toml")])
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                    if r.status == 200 and json.loads(r.read())["configSource"] == "backup":
                        break
            except Exception:
                pass
            time.sleep(0.002)
        times.append((time.monotonic() - start) * 1000)
        gw.kill(); gw.wait()
    if redis:
        redis.kill(); redis.wait()
    return times


def main():
    try:
        with tempfile.TemporaryDirectory() as tmp:
            print("## Management plane\n")
            print(f"- admin change → gateway serving it, long-poll: {summary(change_latency(tmp, 30))}")
            print(f"- admin change → gateway serving it, polling every 10 s: {summary(change_latency(tmp, 0))}")
            for store in ("fs", "sqlite", "redis"):
                print(f"- cold start from the {store} backup, 1,000 APIs: {summary(cold_start(tmp, store))}")
            print(f"- command: `CHANGES={CHANGES} STARTS={STARTS} bench/plane.py`; date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


if __name__ == "__main__":
    main()
