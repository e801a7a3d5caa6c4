"""Thin I/O adapters around the core: REST, WebSocket, store, event socket, metrics, systemd."""
