"""Ray job entrypoint for `distgan tune`: the same flags, plus --smoke-test.

    ray job submit --working-dir . -- python jobs/tune.py --smoke-test

Under `ray job submit` (RAY_ADDRESS set) it joins the running cluster;
run directly, it starts a local Ray.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir

from distgan.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
