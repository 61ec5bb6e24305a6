"""The traffic `kubetune local --traffic` sends: each request once, round robin over the agents, every
answer recorded (RUN_DIR/NAME/answers.jsonl)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from .inputs import Request
from .processes import REQUEST_TIMEOUT, Agent

log = logging.getLogger("kubetune_operator.local.adapterdeployment")

VERSION_HEADER = "x-kubetune-version"  # kubetune_agent.proxy.VERSION_HEADER (the agent is not imported here)
ANSWERS_FILE = "answers.jsonl"


def post_answer(url: str, body: dict, timeout: float = REQUEST_TIMEOUT) -> tuple[int, bytes, str | None]:
    """POST through an agent: (status, body, the version that answered: the agent's x-kubetune-version)."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read(), response.headers.get(VERSION_HEADER)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers.get(VERSION_HEADER)


def answer_record(request: Request, agent: str, status: int, payload: bytes, version: str | None) -> dict:
    """One line of RUN_DIR/NAME/answers.jsonl: what was asked, who answered, what the model said."""
    body = request.body
    when = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    record = {"time": when, "agent": agent, "path": request.path, "model": body.get("model"),
              "input": body.get("input", body.get("prompt")), "status": status, "version": version}
    try:
        parsed = json.loads(payload) if status == 200 else None
    except ValueError:
        parsed = None
    first = ((parsed or {}).get("data") or (parsed or {}).get("choices") or [None])[0] \
        if isinstance(parsed, dict) else None
    if isinstance(first, dict) and "label" in first:  # /classify
        probs = [p for p in first.get("probs") or [] if isinstance(p, int | float)]
        record["label"] = first["label"]
        record["confidence"] = round(max(probs), 4) if probs else None
    elif isinstance(first, dict) and "text" in first:  # completions
        record["text"] = str(first["text"])[:200]
    elif status != 200:
        record["error"] = payload[:300].decode(errors="replace")
    return record


class TrafficSender:
    """Sends each request once, round robin over the agents, at `rate` per second (None: back to back)."""

    def __init__(self, requests: list[Request], agents: list[Agent], rate: float | None,
                 answers_path: Path | None = None):
        self.requests, self.agents, self.rate = requests, agents, rate
        self.answers_path = answers_path
        self.answers: list[dict] = []  # answer_record per request, also appended to answers_path
        self.sent = self.failed = 0
        self.done = False
        self.finished_at = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def cancel(self) -> None:
        self._stop.set()

    def join(self) -> None:
        if self._thread.is_alive():
            self._thread.join(REQUEST_TIMEOUT + 5)

    def _run(self) -> None:
        started = time.monotonic()
        handle = None
        if self.answers_path is not None:
            self.answers_path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(self.answers_path, "w")  # noqa: SIM115 - closed below, whichever way the loop ends
        try:
            self._send(started, handle)
        finally:
            if handle is not None:
                handle.close()

    def _send(self, started: float, handle) -> None:
        for index, request in enumerate(self.requests):
            if self._stop.is_set():
                return
            if self.rate:
                delay = started + index / self.rate - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    return
            agent = self.agents[index % len(self.agents)]
            try:
                status, body, version = post_answer(agent.url + request.path, request.body)
            except OSError as exc:
                status, body, version = 0, str(exc).encode(), None
            answer = answer_record(request, agent.pod, status, body, version)
            self.answers.append(answer)
            if handle is not None:
                handle.write(json.dumps(answer) + "\n")
                handle.flush()
            self.sent += 1
            if status != 200:
                self.failed += 1
                if self.failed <= 3:  # the first few say why; the count says how many
                    log.warning("traffic request failed", extra={"agent": agent.pod, "status": status,
                                                                 "answer": body[:300].decode(errors="replace")})
        self.finished_at = time.monotonic()
        self.done = True
        log.info("traffic sent", extra={"requests": self.sent, "failed": self.failed,
                                        "seconds": round(self.finished_at - started, 1)})


