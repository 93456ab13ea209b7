"""Resources on a cluster that may scale from zero.

A stage that needs CPUs or GPUs asks the cluster for them before it sizes anything:
where an autoscaler runs (cluster.yaml's `min_workers: 0`), it is asked for the bundles
(`ray.autoscaler.sdk.request_resources`) and the stage waits until nodes hold them, or
fails after DISTGAN_SCALE_TIMEOUT seconds (default 900) with one line naming what is
missing. Without an autoscaler (a local Ray, a fixed cluster) what is there now is all
there will be: a request that cannot fit fails at once.
"""
from __future__ import annotations

import json
import os
import time

from .config import UserError

DRIVER = "driver"  # the custom resource cluster.yaml gives the head: where job and trial drivers run
TIMEOUT_ENV = "DISTGAN_SCALE_TIMEOUT"


def driver_resources() -> dict:
    """A Tune trial driver only waits on its TorchTrainer: a sliver of the `driver` resource
    (the CPU-0 head of cluster.yaml) where the cluster offers one, else of any CPU."""
    import ray

    return {DRIVER: 0.01} if ray.cluster_resources().get(DRIVER) else {"CPU": 0.01}


def has_autoscaler() -> bool:
    """Whether an autoscaler that can add nodes runs. Every Ray head runs the autoscaler's
    monitor and publishes its status in the GCS key-value store; without an autoscaling
    config (a local Ray, `ray start` by hand) it runs Ray's read-only provider, whose node
    types are the nodes' own ids (`format_readonly_node_type`). With a cluster config the
    types are the config's names (cluster.yaml's `head`, `gpu_worker`)."""
    from ray._private import ray_constants
    from ray.autoscaler._private.util import format_readonly_node_type
    from ray.experimental.internal_kv import _internal_kv_get

    status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    if not status:
        return False
    mapping = (json.loads(status).get("autoscaler_report") or {}).get("node_type_mapping") or {}
    return any(t != format_readonly_node_type(n) for n, t in mapping.items())


def _fits(bundles: list[dict], have: dict) -> list[str]:
    """The resources (with amounts) that `have` lacks for all of `bundles` at once; [] when they fit."""
    need: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            need[k] = need.get(k, 0) + v
    return [f"{v:g} {k} (the cluster has {have.get(k, 0):g})" for k, v in need.items() if have.get(k, 0) + 1e-9 < v]


def wait_for(bundles: list[dict], what: str, timeout: float | None = None, poll: float = 1.0) -> dict:
    """Block until the cluster's total resources hold `bundles`; returns the cluster's resources.
    `what` names the work in the error ("one trial", "one embedding actor")."""
    import ray

    have = ray.cluster_resources()
    missing = _fits(bundles, have)
    if not missing:
        return have
    if not has_autoscaler():
        raise UserError(f"{what} needs {', '.join(missing)} and this cluster has no autoscaler to add nodes; "
                        "add nodes or ask for less")
    from ray.autoscaler.sdk import request_resources

    timeout = float(os.environ.get(TIMEOUT_ENV, 900)) if timeout is None else timeout
    print(f"waiting for the autoscaler: {what} needs {', '.join(missing)} (up to {timeout:g} s)", flush=True)
    request_resources(bundles=bundles)
    deadline = time.monotonic() + timeout
    while missing and time.monotonic() < deadline:
        time.sleep(poll)
        have = ray.cluster_resources()
        missing = _fits(bundles, have)
    if missing:
        raise UserError(f"{what} needs {', '.join(missing)}: no node joined with it in {timeout:g} s "
                        f"(is there a node type in the cluster config that provides it? {TIMEOUT_ENV} sets the wait)")
    return have
