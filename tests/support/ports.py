"""A free TCP port on loopback, for the servers tests start (S3, a Ray head, proxies)."""

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
