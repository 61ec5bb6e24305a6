"""`kubetune operator` as a real process, as the chart's Deployment runs it: health and metrics on free
loopback ports, output to a pipe or a log file, stopped as the kubelet stops a pod (SIGTERM, then
SIGKILL after the grace period)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import IO

import aiohttp

from .ports import free_ports

PIPE = asyncio.subprocess.PIPE


@dataclass
class OperatorProcess:
    process: asyncio.subprocess.Process
    health_port: int
    metrics_port: int
    output: bytes = b""  # what it printed through a pipe, once stopped

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.health_port}/healthz"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    async def healthy(self) -> bool:
        """/healthz answers 200 (kopf's liveness endpoint): its watches are being served."""
        try:
            async with aiohttp.ClientSession() as session, session.get(self.health_url) as response:
                return response.status == 200
        except aiohttp.ClientError:
            return False

    async def stop(self, grace: float = 30) -> str:
        """SIGTERM, then SIGKILL when it outlives `grace` seconds; its piped output as text."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
        try:
            out, _ = await asyncio.wait_for(self.process.communicate(), timeout=grace)
        except TimeoutError:
            self.process.kill()
            out, _ = await self.process.communicate()
        self.output += out or b""
        return self.output.decode(errors="replace")


async def start(env: dict[str, str], *args: str, stdout: int | IO[bytes] = PIPE) -> OperatorProcess:
    """`python -m kubetune_operator.cli operator ARGS` with this environment (KUBECONFIG, storage)."""
    health, metrics = free_ports(2)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kubetune_operator.cli", "operator", *args,
        "--health-port", str(health), "--metrics-port", str(metrics),
        stdout=stdout, stderr=subprocess.STDOUT, env=env)
    return OperatorProcess(process, health, metrics)


@contextlib.asynccontextmanager
async def running(env: dict[str, str], *args: str, grace: float = 30) -> AsyncIterator[OperatorProcess]:
    """The operator for the block's length, its output piped; stopped on the way out, whatever happens."""
    operator = await start(env, *args)
    try:
        yield operator
    finally:
        await operator.stop(grace)
