"""cprd: hand a live table of open fds from one process to another, losing and duplicating none."""

__version__ = "0.2.0.dev0"
