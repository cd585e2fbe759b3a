"""Fixtures of the library tests: plain functions, no services, and no network beyond this machine."""

from __future__ import annotations

import ipaddress
import socket

import pytest


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch):
    """A library test may serve itself over 127.0.0.1, but a connection anywhere else fails it at once."""
    connect = socket.socket.connect

    def loopback_connect(self, address):
        host = address[0] if isinstance(address, tuple) else None
        if host is not None and not _is_loopback(host):
            raise AssertionError(f"a library test tried to reach {address}: tests never leave this machine")
        return connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_connect)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
