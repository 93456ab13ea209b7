"""The one hook the tests inject faults through: the environment variable DISTGAN_FAULT.

  crash@N   training: rank 1 (or rank 0 alone) raises once after step N
  nan@N     training: the real batch of step N is NaN
  slow@S    every training step, and every embedding or assignment unit, sleeps S seconds:
            time for a test to remove a node, kill an actor or kill the driver mid-stage

Unset (every user's case) each call is one dictionary lookup. Ray workers get the
variable through the job's runtime environment (`init_ray` passes `runtime_env()`), so it
reaches every worker on any node; Ray Train runs also pass it to their workers, for a
Ray that distgan did not start (the tests' shared one)."""
from __future__ import annotations

import os
import time

FAULT_ENV = "DISTGAN_FAULT"


def _fault() -> tuple[str, str]:
    kind, _, arg = os.environ.get(FAULT_ENV, "").partition("@")
    return kind, arg


def fault_at(step: int) -> str | None:
    """The kind of fault injected at this training step (crash | nan), if any."""
    kind, arg = _fault()
    return kind if kind in ("crash", "nan") and arg and int(arg) == step else None


def slow_down() -> None:
    kind, arg = _fault()
    if kind == "slow":
        time.sleep(float(arg))


def runtime_env() -> dict | None:
    """The runtime_env that carries the fault to Ray workers (None when no fault is set)."""
    return {"env_vars": {FAULT_ENV: os.environ[FAULT_ENV]}} if os.environ.get(FAULT_ENV) else None
