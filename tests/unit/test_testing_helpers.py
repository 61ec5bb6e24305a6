"""The shared test and bench helpers (kubetune_testing) that need no server."""

from __future__ import annotations

import socket

from kubetune_testing import factories, ports


def test_free_ports_are_distinct_and_bindable():
    chosen = ports.free_ports(5)
    assert len(set(chosen)) == 5
    for port in chosen:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_factories_give_fresh_copies():
    first, second = factories.finetunejob(), factories.finetunejob()
    first["metadata"]["name"] = "changed"
    assert second["metadata"]["name"] != "changed"
