"""Starting or joining Ray: the one place distgan calls `ray.init`, and the console and
environment settings every Ray it starts gets (loopback-only locally, quiet, fast start-up)."""
from __future__ import annotations

import json
import os
import socket
import sys

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def local_ray_on_loopback() -> None:
    """Make a local Ray (no RAY_ADDRESS) listen on 127.0.0.1 only. On Linux Ray binds
    every interface and advertises the machine's address so other nodes can join; "0"
    in this variable is Ray's own single-machine mode (loopback only, no joining).
    Ray reads it once, when first imported, so this runs before any `import ray`
    (the CLI's first step) and is a no-op after; a value the user set wins."""
    if not os.environ.get("RAY_ADDRESS") and "ray" not in sys.modules:
        os.environ.setdefault(LOOPBACK_ENV, "0")


# The console: distgan's own progress lines and errors; Ray's notices that ask nothing of
# the user are left out through Ray's own settings (`distgan --verbose` keeps them all):
QUIET = {
    # Ray Data's INFO lines (execution-plan dumps, "execution finished", the progress-bar
    # notice), on the driver and, through the job's runtime_env, in every worker; its
    # warnings and errors still print
    "RAY_DATA_LOG_LEVEL": "WARNING",
}
_console = {"verbose": False}
# Ray settings every Ray that distgan starts or joins gets (a value in the environment wins).
RAY_DEFAULTS = {
    # Ray Data's Parquet reader reads the files' footers on a pool of actors started for each
    # read_parquet, 32 by default: on a 2-core machine ten of them start per read, 5 s each,
    # most of a short training run's start-up. A footer is a few KiB and each actor reads 128
    # at once, so two serve thousands of shards.
    "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "2",
}
GCS_PORT_ENV = "RAY_GCS_SERVER_PORT"


def set_console(verbose: bool) -> None:
    """Called once by the CLI, before Ray is imported: quiet (default) or everything."""
    _console["verbose"] = verbose
    if not verbose:
        for k, v in QUIET.items():
            os.environ.setdefault(k, v)  # a value the user set wins
        if not os.environ.get("RAY_ADDRESS"):
            # A local start: token authentication stays on (Ray's default), said explicitly so
            # Ray does not print its "enabled by default" notice. Ray reads it when imported.
            os.environ.setdefault("RAY_AUTH_MODE", "token")


def ray_defaults() -> dict:
    """RAY_DEFAULTS put in this process's environment where unset (the driver reads some of
    them: read_parquet builds its reader here) and returned, for the workers' env_vars."""
    for k, v in RAY_DEFAULTS.items():
        os.environ.setdefault(k, v)
    return {k: os.environ[k] for k in RAY_DEFAULTS}


def ray_data_console(quiet: bool | None = None) -> None:
    """Ray Data's console in a process that runs it (the driver; a task that drives Ray Data
    itself, as the k-means sample's does): its per-operator progress bars off (distgan prints
    its own), and, when quiet, the notice it warns once per process that they are off marked
    as given, through Ray's own once-only log. quiet None: a worker's, from the QUIET variables
    the driver hands every worker when it is quiet."""
    import ray.data
    from ray.util.debug import log_once

    ray.data.DataContext.get_current().enable_progress_bars = False
    if quiet if quiet is not None else bool(os.environ.get(next(iter(QUIET)))):
        log_once("ray_data_progress_manager_disabled")


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster when launched by `ray job submit` (or RAY_ADDRESS is set);
    otherwise start a local Ray on loopback. Locally, Ray gets at least 4 logical CPUs
    so two training workers and Ray Data's read tasks fit on a 2-core laptop; each
    worker then caps its torch threads so they do not fight over the real cores.
    Unless --verbose (`set_console`), the driver's Ray loggers show warnings and errors
    only, not Ray's INFO start-up lines."""
    local_ray_on_loopback()
    import logging

    import ray

    if ray.is_initialized():
        return
    # Ray Data's per-operator progress bars flood a terminal that also shows training
    # progress; distgan prints its own (the setting travels with each Dataset).
    from .. import faults

    quiet = not _console["verbose"]
    ray_data_console(quiet)
    env_vars = {k: os.environ[k] for k in QUIET if quiet and k in os.environ}
    env_vars |= ray_defaults()
    env_vars |= (faults.runtime_env() or {}).get("env_vars", {})  # a test's injected fault reaches every worker
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:  # under `ray job submit`: the job's own env_vars win
        job_env = json.loads(os.environ["RAY_JOB_CONFIG_JSON_ENV_VAR"]).get("runtime_env", {}).get("env_vars", {})
        env_vars = {k: v for k, v in env_vars.items() if k not in job_env}
    kw = {"log_to_driver": True, "runtime_env": {"env_vars": env_vars} if env_vars else None,
          "logging_level": logging.WARNING if quiet else logging.INFO}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **kw)
    else:
        start_local_ray(num_cpus or max(os.cpu_count() or 1, 4), **kw)


def start_local_ray(num_cpus: int, runtime_env: dict | None = None, **kw) -> None:
    """A fresh local Ray (address="local": never a stale cluster file's address) whose
    workers are told where it is. Ray's state API, which Ray Train's placement-group cleaner
    polls from a worker throughout every run, finds the cluster through RAY_ADDRESS or else
    /tmp/ray/ray_current_cluster, the address of the last `ray start` head on this machine:
    once that head is gone, each poll waits 40 s and every training run ends 12 s late (the
    cleaner's stop waits that long for it). So the GCS port is chosen here and handed to
    the workers as RAY_ADDRESS. `kw` goes to ray.init as is."""
    import ray

    local_ray_on_loopback()
    host = ray.util.get_node_ip_address()  # 127.0.0.1 in loopback mode: where the GCS binds
    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    env = {**(runtime_env or {}).get("env_vars", {})}
    env.setdefault("RAY_ADDRESS", f"{host}:{port}")
    before = os.environ.get(GCS_PORT_ENV)
    os.environ[GCS_PORT_ENV] = str(port)  # read by Ray when it starts the head's GCS
    try:
        ray.init(address="local", num_cpus=num_cpus, runtime_env={**(runtime_env or {}), "env_vars": env}, **kw)
    finally:
        if before is None:
            os.environ.pop(GCS_PORT_ENV, None)
        else:
            os.environ[GCS_PORT_ENV] = before
