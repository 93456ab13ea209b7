"""A real Ray head on 127.0.0.1 with token authentication: submit
`jobs/pipeline.py --smoke-test` with `ray job submit --working-dir .`, wait for
SUCCEEDED, check the artifacts; a wrong token is refused. Everything the head
started is stopped at the end, pass or fail."""
import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from procs import stop_head

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, token: str, body: list | None = None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            if body is not None:
                body.append(json.loads(r.read()))
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, ConnectionError):  # not listening yet
        return 0


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    token = secrets.token_hex(32)
    # Every port the head binds is chosen here: Ray's defaults (dashboard agent 52365,
    # client server 10001, ...) are already held by the test session's own Ray, and an
    # agent that cannot bind leaves the head answering "No available agent" forever.
    ports = {name: _free_port() for name in ("port", "dashboard-port", "dashboard-agent-listen-port",
                                             "dashboard-agent-grpc-port", "runtime-env-agent-port",
                                             "metrics-export-port", "ray-client-server-port")}
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    logs = tmp_path_factory.mktemp("head")

    def start():
        # --block keeps `ray start` in the foreground: ending its process group stops
        # this head's processes only (never the test session's own Ray).
        return subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
             "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=4", "--disable-usage-stats",
             *(f"--{name}={port}" for name, port in ports.items())],
            env=env, stdout=open(logs / "head.out", "a"), stderr=subprocess.STDOUT, start_new_session=True,
        )

    head = start()
    url = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        deadline, retried = time.time() + 300, False  # a loaded machine can take minutes to start a head
        while _get(f"{url}/api/version", token) != 200:
            if head.poll() is not None and not retried:  # the dashboard can time out once under load: one more try
                with contextlib.suppress(ProcessLookupError):  # already gone
                    os.killpg(head.pid, signal.SIGKILL)  # whatever the failed start left behind
                time.sleep(2)
                head, retried = start(), True
            elif head.poll() is not None or time.time() > deadline:
                pytest.fail(f"Ray head did not come up: {(logs / 'head.out').read_text()[-2000:]}")
            time.sleep(1)
        yield url, token, env
    finally:
        stop_head(head)


def test_submit_pipeline_smoke_test(ray_head, tmp_path):
    url, token, env = ray_head
    out = tmp_path / "pipe"
    for _ in range(10):  # the head's job agent registers a few seconds after the dashboard answers
        r = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", url, "--working-dir", str(REPO), "--",
             "python", "jobs/pipeline.py", "--smoke-test", "--out", str(out)],
            env=env, capture_output=True, text=True, timeout=900, cwd=REPO,
        )
        if "No available agent" not in r.stderr + r.stdout:
            break
        time.sleep(2)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    job_id = re.search(r"raysubmit_\w+", r.stdout + r.stderr).group(0)
    info: list = []
    assert _get(f"{url}/api/jobs/{job_id}", token, info) == 200
    assert info[0]["status"] == "SUCCEEDED"
    for rel in ("report.html", "pipeline.json", "clusters/embeddings/metrics.json", "probe/probe.json"):
        assert (out / rel).is_file(), rel
    assert "acc (embeddings)" in json.loads((out / "pipeline.json").read_text())["headline"]


def test_wrong_token_is_refused(ray_head):
    url, token, env = ray_head
    assert _get(f"{url}/api/jobs/", token) == 200
    assert _get(f"{url}/api/jobs/", "not-the-token") in (401, 403)
    r = subprocess.run([str(BIN / "ray"), "job", "list", "--address", url], env={**env, "RAY_AUTH_TOKEN": "wrong"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0


def test_cluster_yaml_is_valid_and_keeps_its_promises():
    from ray.autoscaler._private.util import validate_config

    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    validate_config(cfg)  # the schema that ships inside the ray package
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and head["resources"].get("driver", 0) > 0  # drivers, no training
    gpu = [t for name, t in types.items() if name != cfg["head_node_type"]]
    assert gpu and all(t["min_workers"] == 0 for t in gpu)  # autoscaling from zero
    assert all(t["node_config"]["InstanceType"].split(".")[0][0] in "gp" for t in gpu)  # g5/p4d...: GPU instances
    assert "InstanceMarketOptions" not in head["node_config"]  # the head is on-demand
    setup = " ".join(cfg["setup_commands"])
    assert ".[gpu]" in setup and "faiss-cpu" not in setup and "-c constraints.txt" in setup  # run: test_install.py
    starts = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    assert starts.count("RAY_AUTH_MODE=token") == 2
    assert "--dashboard-host=127.0.0.1" in starts and "0.0.0.0" not in starts
    assert cfg["metadata"]["distgan_storage"].startswith("s3://")


LISTENERS = r'''
import glob, os, sys
from distgan.data import init_ray

init_ray(2)
import ray

def tree(root):  # pids of this process and all its descendants
    parent = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = open(stat).read().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        parent[int(stat.split("/")[2])] = int(fields[1])
    pids, grew = {root}, True
    while grew:
        new = {p for p, pp in parent.items() if pp in pids} - pids
        pids |= new
        grew = bool(new)
    return pids

inodes = set()
for pid in tree(os.getpid()):
    for fd in glob.glob(f"/proc/{pid}/fd/*"):
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
listening = set()
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    for row in open(table).read().splitlines()[1:]:
        f = row.split()
        if f[3] == "0A" and f[9] in inodes:  # 0A = LISTEN
            hexip = f[1].split(":")[0]
            listening.add(hexip)
print("NODES", *[n["NodeManagerAddress"] for n in ray.nodes()])
print("LISTEN", *sorted(listening))
ray.shutdown()
'''
# /proc/net/tcp{,6} local addresses of 127.0.0.1 (little-endian hex), and of it mapped into IPv6
LOOPBACK_HEX = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc/net/tcp")
def test_local_ray_listens_on_loopback_only(tmp_path):
    """No RAY_ADDRESS: the local Ray that distgan starts advertises 127.0.0.1, and every
    socket its processes listen on is a loopback one (Ray's default is every interface)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    r = subprocess.run([sys.executable, "-c", LISTENERS], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines() if line.startswith(("NODES", "LISTEN")))
    assert lines["NODES"].split() == ["127.0.0.1"]
    listening = set(lines["LISTEN"].split())
    assert len(listening) >= 1 and listening <= LOOPBACK_HEX, listening


def test_workers_of_a_local_ray_find_it_whatever_the_cluster_file_says(ray_running, tmp_path):
    """Ray's state API, which Ray Train's placement-group cleaner polls from a worker all run,
    looks for the cluster in RAY_ADDRESS, else in ray_current_cluster (the last `ray start`
    head, stale once that head is gone: each poll then hangs 40 s). A local Ray's workers
    are given its address, so a stale file (here in a temp dir, not /tmp/ray) is not read."""
    import ray

    (tmp_path / "ray_current_cluster").write_text("127.0.0.1:9")  # a head that is gone

    @ray.remote(num_cpus=0)
    def resolve(temp_dir):
        from ray._private.services import canonicalize_bootstrap_address_or_die

        return canonicalize_bootstrap_address_or_die(None, temp_dir=temp_dir)

    assert ray.get(resolve.remote(str(tmp_path))) == ray.get_runtime_context().gcs_address
