"""A local Radicale CalDAV server in a child process: the real CalDAV server the CalDAV connector's
tests run against, and the calendar the demo books into.

`RadicaleServer(folder, users={"alice": "secret"})` writes a Radicale configuration, a plain-text
htpasswd file and a storage folder under `folder`, and `start()` runs `python -m radicale` with that
configuration alone (`--config`, so no /etc/radicale or ~/.config/radicale is read). The configuration
and users are the server's own (named by its port), so several servers may share one storage folder
(gateways on one home; Radicale locks its storage): none rewrites another's port. Each user owns
the collections under `/<user>/` (Radicale's `owner_only` rights) unless a rights file is given.
`make_calendar` creates a calendar collection the documented CalDAV way, a MKCALENDAR request (RFC
4791 5.3.1) sent by the `caldav` client as that user, so the server writes its own storage layout.

A server for 127.0.0.1: it has no TLS, keeps passwords in plain text and answers a wrong password
at once (Radicale's brute-force delays are turned off).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from caldav.collection import Calendar, CalendarSet
from caldav.davclient import DAVClient
from caldav.lib.error import DAVError

RADICALE_WITH_ITS_PARENT = """
import os, runpy, sys, threading, time
parent = int(sys.argv.pop(1))
def watch():
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)
threading.Thread(target=watch, daemon=True).start()
runpy.run_module("radicale", run_name="__main__", alter_sys=True)
"""
"""Radicale, ended when the process that started it is gone (it is adopted by another): a gateway killed
outright (SIGKILL, the OOM killer) runs no `stop()`, and its Radicale lived on, holding its port, one
more for each crash. (Not PR_SET_PDEATHSIG: that follows the starting thread, and a server started from
a pool's thread would die with the thread.)"""
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
LOG_TAIL_CHARS = 2000


class RadicaleError(RuntimeError):
    """The server could not start (its log's tail says why), or a collection could not be made."""


class RadicaleServer:
    """`with RadicaleServer(folder, users={"alice": "secret"}) as server:` on `server.url`."""

    def __init__(self, folder: Path, host: str = "127.0.0.1", port: int = 0, *,
                 users: Mapping[str, str], rights: str | None = None) -> None:
        """`port` 0 picks a free one. `rights` is the text of a Radicale rights file (its `from_file`
        rights type) where owners alone may not do: e.g. a second user who may only read."""
        bad = [name for name in users if not name or ":" in name or "/" in name or name != name.strip()]
        if bad:
            raise ValueError(f"user names cannot be empty or hold ':', '/' or outer spaces: {bad}")
        self.folder = folder
        self.host = host
        self._reservation: socket.socket | None = None
        """Holds a port chosen here until the server answers on it: else, in the time between (a gateway's
        whole start), a connection's ephemeral port or another server could take it."""
        if not port:
            self._reservation = _reserved_port(host)
            port = int(self._reservation.getsockname()[1])
        self.port = port
        """Chosen when the server is made (0: a free one), so that its URL is known before it starts."""
        self.users = dict(users)
        self.rights = rights
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The server's root, e.g. `http://127.0.0.1:43125/`; a user's collections are under `<url><user>/`."""
        return f"http://{self.host}:{self.port}/"

    @property
    def log_path(self) -> Path:
        return self.folder / "radicale.log"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Starts the server and returns once it accepts connections on its port; raises RadicaleError
        with the tail of its log where it exits first (a port in use, a bad configuration)."""
        if self._process is not None:
            raise RadicaleError("the server is already started")
        if not _port_free(self.host, self.port):
            # Polling would connect to whoever holds the port and take it for Radicale.
            raise RadicaleError(f"{self.host}:{self.port} is in use by another process")
        config = self._write_config()
        env = {k: v for k, v in os.environ.items() if k != "RADICALE_CONFIG"}
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-c", RADICALE_WITH_ITS_PARENT, str(os.getpid()), "--config", str(config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._answers():
            if self._process.poll() is not None:
                code = self._process.returncode
                self._process = None
                self._remove_config()
                raise RadicaleError(f"radicale exited with status {code} before answering on "
                                    f"{self.host}:{self.port}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RadicaleError(f"radicale did not answer on {self.host}:{self.port} within "
                                    f"{START_TIMEOUT_S:.0f} s:\n{self.log_tail()}")
            time.sleep(0.02)  # the poll's interval, not a wait for readiness
        self._release()

    def _release(self) -> None:
        if self._reservation is not None:
            self._reservation.close()
            self._reservation = None

    def stop(self) -> None:
        """Stops the server (SIGTERM, then SIGKILL after STOP_TIMEOUT_S); stopping a stopped one does nothing."""
        self._release()
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._remove_config()

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return ""

    def make_calendar(self, user: str, calendar_id: str, display_name: str = "") -> str:
        """Creates the calendar collection `/<user>/<calendar_id>/` (events only) with a MKCALENDAR
        request as `user`: its URL."""
        with DAVClient(url=self.url, username=user, password=self.users[user], auth_type="basic",
                              timeout=10, enable_rfc6764=False) as client:
            home = CalendarSet(client=client, url=f"{self.url}{user}/")
            try:
                calendar = home.make_calendar(name=display_name or None, cal_id=calendar_id,
                                              supported_calendar_component_set=["VEVENT"])
            except DAVError as exc:
                raise RadicaleError(f"MKCALENDAR /{user}/{calendar_id}/ failed: {exc}") from None
            assert isinstance(calendar, Calendar)  # a synchronous client's answer, not a coroutine
            return str(calendar.url)

    def __enter__(self) -> RadicaleServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _write_config(self) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        users_file = self.folder / f"users.{self.port}"
        users_file.touch(mode=0o600)
        users_file.write_text("".join(f"{name}:{password}\n" for name, password in self.users.items()),
                              encoding="utf-8")
        rights = ""
        if self.rights is not None:
            rights_file = self.folder / f"rights.{self.port}"
            rights_file.write_text(self.rights, encoding="utf-8")
            rights = f"[rights]\ntype = from_file\nfile = {rights_file}\n"
        config = self.folder / f"config.{self.port}"
        config.write_text(
            "[server]\n"
            f"hosts = {self.host}:{self.port}\n"
            "delay_on_error = 0\n"
            "[auth]\n"
            "type = htpasswd\n"
            f"htpasswd_filename = {users_file}\n"
            "htpasswd_encryption = plain\n"
            "delay = 0\n"
            f"{rights}"
            "[storage]\n"
            f"filesystem_folder = {self.folder / 'collections'}\n"
            "[web]\n"
            "type = none\n"
            "[logging]\n"
            "level = warning\n",
            encoding="utf-8")
        return config

    def _remove_config(self) -> None:
        """This server's files (the users' passwords among them) go with it; the storage stays."""
        for name in ("config", "users", "rights"):
            (self.folder / f"{name}.{self.port}").unlink(missing_ok=True)

    def _answers(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), timeout=0.5):
            return True
        return False


def _reserved_port(host: str) -> socket.socket:
    """A socket bound to a free port and not listening. With SO_REUSEADDR on both, Radicale can still bind
    the port and listen. But no connection's ephemeral port and no other bind without SO_REUSEADDR can
    take it while the socket is open."""
    reservation = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    reservation.bind((host, 0))
    return reservation


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Radicale binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.errno != errno.EADDRINUSE  # anything else is Radicale's to report
        return True
