"""Drive the official Python SDK ``ringcentral==0.9.2`` (unmodified) against a server.

Runs in its own venv (see tests/fidelity/installs.py). Logs in with the JWT grant, opens the
WebSocket, subscribes to the given event filters and prints one JSON line per event on stdout:
``{"event": "connectionCreated"}``, ``{"event": "subscriptionCreated", "id": …}``,
``{"event": "notification", "frame": [meta, body]}``; exits 0 after ``--count`` notifications.

    python py_sdk.py SERVER CLIENT_ID CLIENT_SECRET JWT --count N FILTER [FILTER …]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from ringcentral import SDK
from ringcentral.websocket.events import WebSocketEvents


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


async def main() -> int:
    parser = argparse.ArgumentParser()
    for name in ("server", "client_id", "client_secret", "jwt"):
        parser.add_argument(name)
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("filters", nargs="+")
    args = parser.parse_args()

    sdk = SDK(args.client_id, args.client_secret, args.server, "faxd-fidelity", "0.1")
    platform = sdk.platform()
    platform.login(jwt=args.jwt)
    emit("loggedIn")

    ws = sdk.create_web_socket_client()
    received: list[Any] = []
    done = asyncio.get_running_loop().create_future()

    def on_notification(frame: Any) -> None:
        received.append(frame)
        emit("notification", frame=frame)
        if len(received) >= args.count and not done.done():
            done.set_result(None)

    def on_subscription(subscription: Any) -> None:
        emit("subscriptionCreated", id=subscription.get_subscription_info()[1]["id"])

    ws.on(WebSocketEvents.connectionCreated, lambda _client: emit("connectionCreated"))
    ws.on(WebSocketEvents.subscriptionCreated, on_subscription)
    ws.on(WebSocketEvents.receiveSubscriptionNotification, on_notification)

    connection = asyncio.create_task(ws.create_new_connection())
    await ws.create_subscription(args.filters)
    waiter = asyncio.ensure_future(done)
    finished, _ = await asyncio.wait({waiter, connection}, return_when=asyncio.FIRST_COMPLETED)
    if connection in finished:
        emit("connectionClosed", error=repr(connection.exception()))
        return 1
    await ws.close_connection()
    connection.cancel()
    emit("done")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
