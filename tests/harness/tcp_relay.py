"""Relay stdin/stdout to a TCP address: an SSH ``ProxyCommand`` into a network namespace.

``nsenter -t LEADER -n python3 tcp_relay.py 127.0.0.1 22`` connects to the
container's sshd on its private loopback, with no veth or address to manage.
"""

from __future__ import annotations

import os
import selectors
import socket
import sys


def relay(host: str, port: int) -> None:
    connection = socket.create_connection((host, port), timeout=10)
    connection.settimeout(None)
    selector = selectors.DefaultSelector()
    selector.register(sys.stdin.fileno(), selectors.EVENT_READ, "in")
    selector.register(connection, selectors.EVENT_READ, "sock")
    while True:
        for key, _events in selector.select():
            if key.data == "in":
                data = os.read(sys.stdin.fileno(), 65536)
                if not data:
                    connection.shutdown(socket.SHUT_WR)
                    selector.unregister(sys.stdin.fileno())
                    continue
                connection.sendall(data)
            else:
                data = connection.recv(65536)
                if not data:
                    return
                os.write(sys.stdout.fileno(), data)


if __name__ == "__main__":
    relay(sys.argv[1], int(sys.argv[2]))
