"""Storage unavailable while the trainer publishes (issue 8), against SeaweedFS behind a dropping proxy.

A transient outage is retried and the adapter published whole; a permanent one fails the publish as
retryable (exit 143) with no manifest; a manifest is never visible without all its files
(docs/testing.md, Faults). The trainer killed mid-run and resuming is tests/trainer/test_resume.py.
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import threading
from pathlib import Path

import pytest

from kubetune.api import jobconfig, storage_layout
from kubetune.clients.storage import ObjectStore, S3Settings, check_published, publish_adapter
from kubetune_testing.seaweedfs import ACCESS_KEY, BUCKET, SECRET_KEY
from kubetune_trainer.failures import is_retryable
from tests.integration.conftest import s3_server  # noqa: F401 (fixture)


class FlakyProxy:
    """A TCP proxy to the S3 server that drops connections on demand: `drop_next(n)` closes the next n
    connections at once (no response: the server is unreachable), `down()` drops all of them until
    `up()`, and `drop_rate` drops that fraction of connections at random (seeded)."""

    def __init__(self, target: str, seed: int = 0):
        host, port = target.removeprefix("http://").split(":")
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.lock = threading.Lock()
        self.to_drop, self.is_down, self.drop_rate = 0, False, 0.0
        self.rng = random.Random(seed)
        self.dropped = self.forwarded = 0
        self.closing = False
        self.active: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    def drop_next(self, count: int) -> None:
        with self.lock:
            self.to_drop = count

    def down(self) -> None:
        """Unreachable from now on: new connections are refused, open ones (keep-alive) cut."""
        with self.lock:
            self.is_down = True
            open_now, self.active = list(self.active), set()
        for sock in open_now:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def up(self) -> None:
        self.is_down = False

    def _accept(self) -> None:
        while not self.closing:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                drop = self.is_down or self.to_drop > 0 or (self.drop_rate and self.rng.random() < self.drop_rate)
                self.to_drop = max(0, self.to_drop - 1)
                if drop:
                    self.dropped += 1
                else:
                    self.forwarded += 1
            if drop:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                client.close()  # reset: the client sees the connection refused/reset, never a response
                continue
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.active.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.closing = True
        self.listener.close()


@pytest.fixture()
def proxy(s3_server):  # noqa: F811 (the fixture imported above)
    handle = FlakyProxy(s3_server.endpoint)
    yield handle
    handle.close()


def store_at(endpoint: str) -> ObjectStore:
    return ObjectStore(S3Settings(endpoint=endpoint, access_key=ACCESS_KEY, secret_key=SECRET_KEY))


def adapter(tmp_path: Path, label: str, files: int = 3) -> Path:
    root = tmp_path / label
    root.mkdir()
    rng = random.Random(label)
    for i in range(files):
        (root / f"part-{i}.safetensors").write_bytes(rng.randbytes(4096))
    (root / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    return root


def prefix_for(label: str) -> str:
    return storage_layout.job_prefix(f"s3://{BUCKET}/publish-faults", "team-a", label, f"uid-{label}")


def assert_whole_or_absent(direct: ObjectStore, prefix: str) -> bool:
    """A manifest, if any, lists only files that are all there with their size and sha256."""
    check = check_published(direct, prefix)
    if check.found:
        assert not check.problems, check.problems
    return check.found


def test_a_transient_outage_during_publishing_is_retried_and_the_adapter_published_whole(
        proxy, s3_server, tmp_path):  # noqa: F811 (the fixture imported above)
    direct = s3_server.store()
    prefix = prefix_for("transient")
    proxy.drop_next(3)  # the first connections find the server unreachable (botocore tries 5 times)
    document = publish_adapter(store_at(proxy.endpoint), adapter(tmp_path, "transient"), prefix, {"rank": 8})
    assert proxy.dropped == 3 and proxy.forwarded > 0
    assert assert_whole_or_absent(direct, prefix)
    check = check_published(direct, prefix)
    assert check.document["digest"] == document["digest"]
    listed = direct.list(storage_layout.adapter_prefix(prefix, document["digest"]))
    assert sorted(u.rsplit("/", 1)[1] for u in listed) == sorted(f["path"] for f in document["files"])


def test_storage_down_for_good_fails_the_publish_as_retryable_and_writes_no_manifest(
        proxy, s3_server, tmp_path):  # noqa: F811
    direct = s3_server.store()
    prefix = prefix_for("down")
    store = store_at(proxy.endpoint)
    uploads = 0
    upload = store.upload_file

    def upload_then_outage(path, uri):  # the server goes away after the first file is up
        nonlocal uploads
        upload(path, uri)
        uploads += 1
        proxy.down()

    store.upload_file = upload_then_outage
    with pytest.raises(Exception) as failure:
        publish_adapter(store, adapter(tmp_path, "down"), prefix, {"rank": 8})
    assert uploads == 1 and proxy.dropped >= 5  # botocore retried before giving up
    # the trainer exits with the retryable code: the pod restarts and resumes from its last checkpoint
    assert is_retryable(failure.value), repr(failure.value)
    assert jobconfig.EXIT_RETRYABLE == 143
    assert direct.read(storage_layout.manifest_uri(prefix)) is None
    assert not assert_whole_or_absent(direct, prefix)
    proxy.up()
    # the next attempt (the restarted pod) publishes the same adapter whole, at the same digest
    document = publish_adapter(store_at(proxy.endpoint), tmp_path / "down", prefix, {"rank": 8})
    assert assert_whole_or_absent(direct, prefix)
    assert check_published(direct, prefix).document["digest"] == document["digest"]


@pytest.mark.parametrize("seed", range(3))
def test_a_manifest_is_never_visible_without_all_its_files(proxy, s3_server, tmp_path, seed):  # noqa: F811
    """Connections dropped at random while several adapters publish: each ends whole, or without a
    manifest (when botocore's retries ran out), never a manifest with a missing file."""
    direct = s3_server.store()
    proxy.rng, proxy.drop_rate = random.Random(seed), 0.3
    outcomes = []
    for i in range(4):
        label = f"random-{seed}-{i}"
        prefix = prefix_for(label)
        try:
            publish_adapter(store_at(proxy.endpoint), adapter(tmp_path, label, files=4), prefix, {"rank": 8})
            outcomes.append("published")
        except Exception as exc:
            assert is_retryable(exc), repr(exc)
            outcomes.append("failed")
        published = assert_whole_or_absent(direct, prefix)
        assert published == (outcomes[-1] == "published")
    assert proxy.dropped > 0
