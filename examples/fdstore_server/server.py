"""A small HTTP/1.1 keep-alive server that survives its own restarts, kill -9 included, without
dropping a connection, using nothing but systemd's fd store protocol (python3-systemd).

    cprd run --name web -- /usr/bin/python3 examples/fdstore_server/server.py [--port P]

It never imports cprd: run under systemd with FileDescriptorStoreMax= it works the same way.

- At start it takes the fds it stored before, as systemd hands them back (LISTEN_FDS,
  LISTEN_FDNAMES): "listen" is its listening socket, "c-..." are client connections. With no
  listening socket it makes one on 127.0.0.1:PORT and stores it (FDSTORE=1, FDNAME=listen).
- Each connection it accepts is stored at once under a name of its own (FDNAME=c-INODE), and
  removed from the store (FDSTOREREMOVE=1) when the client closes it. The store, not this process,
  keeps the connection open: when this process dies, the next one gets it back.
- A request is only *peeked* at (MSG_PEEK) until its answer is sent; then it is consumed. A server
  killed in between leaves the request in the socket for the next one, so no request is lost to a
  kill -9 (a kill in the few instructions between send and consume would answer one twice).
- A barrier (BARRIER=1, a pipe's write end: what sd_notify_barrier() does) after each store makes
  sure the store holds the fd before the server serves on it.
- SIGTERM: it finishes the answer it is writing and exits 0; the store keeps everything.

It reports in JSON lines on stdout: {"event": "ready", "pid", "port", "listen": "created"|"stored",
"connections": N} and {"event": "accepted", "name"}, {"event": "closed", "name"}, {"event":
"stopped", "served": N}.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import socket
import sys

from systemd import daemon

MAX_REQUEST = 16 * 1024


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def notify(state: str, fds: list[int] = ()) -> bool:
    """daemon.notify, sent again when a signal interrupted it (a C call: Python does not retry it)."""
    while True:
        try:
            return daemon.notify(state, fds=list(fds))
        except InterruptedError:
            continue


def barrier(timeout: float = 10.0) -> None:
    """Wait until the store has handled every message sent before (sd_notify_barrier)."""
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        notify("BARRIER=1", [w])
        os.close(w)
        w = -1
        sel = selectors.DefaultSelector()
        sel.register(r, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise TimeoutError("the fd store did not answer a barrier")
        sel.close()
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def store(fd: int, name: str) -> None:
    if not notify(f"FDSTORE=1\nFDNAME={name}", [fd]):
        raise RuntimeError("no fd store ($NOTIFY_SOCKET is not set): run me with `cprd run --name web -- ...`")
    barrier()


class Server:
    def __init__(self, port: int) -> None:
        self.sel = selectors.DefaultSelector()
        self.served = 0
        self.conns: dict[int, tuple[socket.socket, str]] = {}
        got = daemon.listen_fds_with_names(unset_environment=True)  # {fd: name}, fds 3, 4, ...
        self.lsock = None
        for fd, name in sorted(got.items()):
            s = socket.socket(fileno=fd)
            if name == "listen" and self.lsock is None:
                self.lsock, origin = s, "stored"
            elif name.startswith("c-"):
                self.add(s, name)
            else:
                s.close()
        if self.lsock is None:
            self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.lsock.bind(("127.0.0.1", port))
            self.lsock.listen(1024)
            store(self.lsock.fileno(), "listen")
            origin = "created"
        # O_NONBLOCK is shared with the store's copy, which never reads: fine.
        self.lsock.setblocking(False)
        self.sel.register(self.lsock, selectors.EVENT_READ, "accept")
        self.origin = origin

    def add(self, conn: socket.socket, name: str) -> None:
        conn.setblocking(True)
        conn.settimeout(10)
        self.conns[conn.fileno()] = (conn, name)
        self.sel.register(conn, selectors.EVENT_READ, "conn")

    def accept(self) -> None:
        try:
            conn, _ = self.lsock.accept()
        except (BlockingIOError, InterruptedError):
            return
        name = f"c-{os.fstat(conn.fileno()).st_ino}"
        store(conn.fileno(), name)  # from now on the connection outlives this process
        self.add(conn, name)
        emit(event="accepted", name=name)

    def close(self, fd: int) -> None:
        conn, name = self.conns.pop(fd)
        self.sel.unregister(conn)
        notify(f"FDSTOREREMOVE=1\nFDNAME={name}")
        conn.close()
        emit(event="closed", name=name)

    def serve_one(self, fd: int) -> None:
        conn, _ = self.conns[fd]
        try:
            data = conn.recv(MAX_REQUEST, socket.MSG_PEEK)
        except OSError:
            data = b""
        if not data:
            self.close(fd)
            return
        end = data.find(b"\r\n\r\n")
        if end < 0:
            if len(data) >= MAX_REQUEST:
                self.close(fd)
            return  # the rest of the request is on its way
        request = data[: end + 4]
        line = request.split(b"\r\n", 1)[0].decode("latin-1")
        if line.startswith("GET "):
            status, body = "200 OK", f"hello from pid {os.getpid()}\n".encode()
        else:
            status, body = "400 Bad Request", b"only GET is served here\n"
        head = f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        try:
            conn.sendall(head + body)
            conn.recv(len(request))  # consumed only now that it is answered
        except OSError:
            self.close(fd)
            return
        self.served += 1

    def run(self, stop_fd: int) -> None:
        self.sel.register(stop_fd, selectors.EVENT_READ, "stop")
        emit(event="ready", pid=os.getpid(), port=self.lsock.getsockname()[1], listen=self.origin,
             connections=len(self.conns))
        while True:
            for key, _ in self.sel.select():
                if key.data == "stop":
                    return
                if key.data == "accept":
                    self.accept()
                elif key.fd in self.conns:
                    self.serve_one(key.fd)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 if there is no stored socket (0: any)")
    a = p.parse_args()
    if "NOTIFY_SOCKET" not in os.environ:
        print("server: error: $NOTIFY_SOCKET is not set: run me with `cprd run --name web -- ...` (or under "
              "systemd with FileDescriptorStoreMax=)", file=sys.stderr)
        return 2
    stop_r, stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(stop_w, warn_on_full_buffer=False)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)  # the wakeup fd does the work
    server = Server(a.port)
    notify("READY=1\nSTATUS=serving")
    server.run(stop_r)
    emit(event="stopped", pid=os.getpid(), served=server.served)
    return 0


if __name__ == "__main__":
    sys.exit(main())
