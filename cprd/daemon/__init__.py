"""The daemon, as named parts:

- ``state``: what a daemon is made of (DaemonState, Config), built the same way by a source, a
  target and a restored upgrade;
- ``lifecycle``: serving, handing-off, handed-off, upgrading, and the transitions between them;
- ``replies``: the answers to recent mutations, for exactly-once retries;
- ``endpoint``: the control socket, who gets a connection, each connection's loop;
- ``handlers``: what each control request does, keyed like the control protocol's ops;
- ``core``: the Daemon that holds them, and the two requests that move the whole table
  (handoff, upgrade);
- ``main``: `cprd source`, `cprd target` and the new program of an in-place upgrade.
"""

from .core import Daemon
from .main import populate_table, restore_main, serve_source, serve_target
from .state import Config, DaemonState

__all__ = ["Config", "Daemon", "DaemonState", "populate_table", "restore_main", "serve_source", "serve_target"]
