"""A tiny HTTP server whose listening socket lives in cprd, so that it can be restarted without
refusing a single connection.

    python examples/zero_downtime_server/server.py [--control PATH] [--port P] [--generation N]

On start it asks cprd for ("http", 0). If cprd has it, the server uses that very listening socket
(the same open file description the previous server accepted on: its backlog of waiting
connections included). If not, it creates one on 127.0.0.1:PORT (0: an ephemeral port), binds,
listens and stores it in cprd. Then it accepts and answers each request on a pool of threads.

On SIGTERM (or SIGINT) it stops gracefully: it stops accepting, finishes the requests it has
accepted, closes its copy of the socket and exits 0. The socket stays open in cprd, and so in the
kernel: connections that arrive meanwhile wait in the backlog for the next server.

It speaks to its runner in JSON lines on stdout:
    {"event": "ready", "pid": ..., "port": ..., "socket": "created" | "from-cprd", "cprd_pid": ...}
    {"event": "stopped", "pid": ..., "served": N}
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

from cprd.client import Client
from cprd.errors import CprdError, KeyExists, KeyMissing

KEY = ("http", 0)
MAX_REQUEST = 16 * 1024


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def listening_socket(c: Client, port: int) -> tuple[socket.socket, str]:
    """The listening socket stored in cprd under KEY, or a new one stored there now."""
    try:
        _, fd = c.get(*KEY)
        return socket.socket(fileno=fd), "from-cprd"
    except KeyMissing:
        pass
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(1024)
        c.put(*KEY, s.fileno())
    except KeyExists:  # another server stored one first: use that one
        s.close()
        _, fd = c.get(*KEY)
        return socket.socket(fileno=fd), "from-cprd"
    except BaseException:
        s.close()
        raise
    return s, "created"


class Server:
    def __init__(self, lsock: socket.socket, generation: int) -> None:
        self.lsock = lsock
        self.generation = generation
        self.served = 0
        self._lock = threading.Lock()

    def handle(self, conn: socket.socket) -> None:
        """Read one request, answer it, close (no keep-alive: each request is its own connection)."""
        with conn:
            conn.settimeout(10)
            data = b""
            try:
                while b"\r\n\r\n" not in data and len(data) < MAX_REQUEST:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return  # the client went away before it finished its request
                    data += chunk
                line = data.split(b"\r\n", 1)[0].decode("latin-1")
                if line.startswith("GET "):
                    status = "200 OK"
                    body = f"hello from pid {os.getpid()} (server generation {self.generation})\n".encode()
                else:
                    status, body = "400 Bad Request", b"only GET is served here\n"
                head = (f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
                        "Connection: close\r\n\r\n").encode()
                conn.sendall(head + body)
            except OSError:
                return  # the client reset or timed out: nothing to answer
        with self._lock:
            self.served += 1

    def serve(self, stop_fd: int) -> None:
        """Accept until a byte arrives on stop_fd, then let the accepted requests finish."""
        # O_NONBLOCK is shared by every holder of this socket (cprd and the next server too): each
        # server must cope with another process taking a connection first, which is what it is for.
        self.lsock.setblocking(False)
        with ThreadPoolExecutor(max_workers=16, thread_name_prefix="http") as pool, \
                selectors.DefaultSelector() as sel:
            sel.register(self.lsock, selectors.EVENT_READ, "accept")
            sel.register(stop_fd, selectors.EVENT_READ, "stop")
            while True:
                events = sel.select()
                if any(key.data == "stop" for key, _ in events):
                    break
                try:
                    conn, _ = self.lsock.accept()
                except (BlockingIOError, InterruptedError):
                    continue  # the other server (or a signal) was faster
                except OSError as e:
                    print(f"server: accept failed: {e}", file=sys.stderr)
                    continue
                conn.setblocking(True)
                pool.submit(self.handle, conn)
        # leaving the with-block waited for every accepted request to be answered


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--control", help="cprd control socket (default $CPRD_CONTROL or cprd's default)")
    p.add_argument("--port", type=int, default=0,
                   help="port on 127.0.0.1 if the socket is new (0: ephemeral)")
    p.add_argument("--generation", type=int, default=0,
                   help="a number shown in answers, to tell servers apart")
    a = p.parse_args()

    stop_r, stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(stop_w, warn_on_full_buffer=False)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)  # the wakeup fd does the work
    try:
        with Client(a.control) as c:
            lsock, origin = listening_socket(c, a.port)
            cprd_pid = c.status()["pid"]
    except CprdError as e:
        print(f"server: error: cannot get the listening socket from cprd: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"server: error: cannot listen on 127.0.0.1:{a.port}: {e.strerror}", file=sys.stderr)
        return 1
    with lsock:
        server = Server(lsock, a.generation)
        emit(event="ready", pid=os.getpid(), port=lsock.getsockname()[1], socket=origin, cprd_pid=cprd_pid)
        server.serve(stop_r)
    emit(event="stopped", pid=os.getpid(), served=server.served)
    return 0


if __name__ == "__main__":
    sys.exit(main())
