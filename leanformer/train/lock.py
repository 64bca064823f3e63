"""One run per output folder: an exclusive lock on ``OUT/.lock`` that names its holder.

The lock is an ``flock`` on the file, so the system releases it when the process dies (a killed run never
leaves a stale lock); the file holds the holder's PID, host and start time for the error message.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
from pathlib import Path

from leanformer.config import ConfigError

LOCK_NAME = ".lock"


class OutputInUse(ConfigError):
    """Another process is writing to the same output folder."""


class OutputLock:
    """``with OutputLock(out):`` or ``acquire()`` / ``release()``; raises :class:`OutputInUse` if held."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.file = self.folder / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        import fcntl

        if self._fd is not None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise OutputInUse(f"output folder {self.folder} is in use by {self._holder()}; wait for that run "
                              "to finish, stop it, or pass another --out") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def _holder(self) -> str:
        try:
            info = json.loads(self.file.read_text())
            return f"PID {info['pid']} on host {info['host']} (since {info['started']})"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()
