"""One training run per checkpoint directory.

A training run takes `<checkpoint_dir>/RUN_LOCK.json` at start: a small JSON object naming its
holder (host, process id, start time) and a heartbeat time that a background thread refreshes.
A second run on the same directory is refused, naming the holder. A lock whose holder is gone
is taken over with a warning: the holder's process no longer runs on this host, or its
heartbeat is older than `stale_after_s` (the holder died on another host, or hangs).

The lock is read first; if absent it is created atomically: a local file with O_EXCL, on gs://
an upload with google-cloud-storage's `if_generation_match=0` (created only if absent). Takeover,
heartbeat and release are conditional on the version seen (the file's content under an flock;
the object's generation), so a run that lost its lock never overwrites the new holder's. The
eval job reads checkpoints only and takes no lock.
"""

import contextlib
import dataclasses
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from typing import Iterator, Optional, Tuple

from absl import logging

from data import gcs

LOCK_NAME = "RUN_LOCK.json"


class RunLockedError(RuntimeError):
    """Another live run holds the checkpoint directory's lock."""


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds a lock, and when it last said it was alive."""
    host: str
    pid: int
    started: float
    heartbeat: float
    nonce: str

    @classmethod
    def me(cls) -> "Holder":
        now = time.time()
        return cls(socket.gethostname(), os.getpid(), now, now, uuid.uuid4().hex)

    @classmethod
    def parse(cls, text: str) -> Optional["Holder"]:
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError):
            return None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        return (f"host {self.host}, process {self.pid}, started {started}, last heartbeat "
                f"{max(time.time() - self.heartbeat, 0):.0f} s ago")

    def gone(self, stale_after_s: float) -> Optional[str]:
        """Why the holder is gone, or None while it is alive."""
        if self.host == socket.gethostname() and not _process_alive(self.pid):
            return f"process {self.pid} no longer runs on this host"
        age = time.time() - self.heartbeat
        if age > stale_after_s:
            return f"its heartbeat is {age:.0f} s old (stale after {stale_after_s:g} s)"
        return None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _LocalStore:
    """The lock file on a local (or mounted shared) file system. Compare-and-swap updates hold
    an flock on a sibling file for the few microseconds of the read-compare-write."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(path), exist_ok=True)

    @contextlib.contextmanager
    def _mutex(self) -> Iterator[None]:
        with open(self.path + ".mutex", "a", encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def create(self, text: str) -> Optional[str]:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        return text

    def read(self) -> Optional[Tuple[str, str]]:
        try:
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            return None
        return text, text

    def replace(self, text: str, token: str) -> Optional[str]:
        with self._mutex():
            current = self.read()
            if current is None or current[1] != token:
                return None
            tmp = f"{self.path}.tmp-{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, self.path)
            return text

    def delete(self, token: str) -> None:
        with self._mutex():
            current = self.read()
            if current is not None and current[1] == token:
                os.remove(self.path)


class _GcsStore:
    """The lock object on gs://, updated only if its generation is the one this run saw."""

    def __init__(self, url: str, storage_options: Optional[dict] = None, timeout: float = 30.0):
        # pylint: disable=import-outside-toplevel
        from google.api_core import exceptions
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage
        self._conflict = (exceptions.PreconditionFailed, exceptions.NotFound)
        self.path = url
        bucket, name = url.split("://", 1)[1].split("/", 1)
        endpoint = gcs.endpoint(storage_options)
        if endpoint:
            client = storage.Client(
                project="anonymous", credentials=AnonymousCredentials(),
                client_options={"api_endpoint": endpoint if "://" in endpoint
                                else f"http://{endpoint}"})
        else:
            client = storage.Client()
        self._bucket, self._name, self._timeout = client.bucket(bucket), name, timeout

    def _blob(self):
        return self._bucket.blob(self._name)

    def create(self, text: str) -> Optional[int]:
        blob = self._blob()
        try:
            blob.upload_from_string(text, if_generation_match=0, timeout=self._timeout)
        except self._conflict:
            return None
        return blob.generation

    def read(self) -> Optional[Tuple[str, Optional[int]]]:
        blob = self._bucket.get_blob(self._name, timeout=self._timeout)
        if blob is None:
            return None
        return blob.download_as_text(timeout=self._timeout), blob.generation

    def replace(self, text: str, token: Optional[int]) -> Optional[int]:
        blob = self._blob()
        try:
            blob.upload_from_string(text, if_generation_match=token, timeout=self._timeout)
        except self._conflict:
            return None
        return blob.generation

    def delete(self, token: Optional[int]) -> None:
        try:
            self._blob().delete(if_generation_match=token, timeout=self._timeout)
        except self._conflict:
            pass


class RunLock:
    """The lock of one checkpoint directory; `acquire()` at start, `release()` at the end."""

    def __init__(self, checkpoint_dir: str, *, stale_after_s: float = 300.0,
                 storage_options: Optional[dict] = None):
        root = str(checkpoint_dir).rstrip("/")
        path = f"{root}/{LOCK_NAME}"
        self._store = _GcsStore(path, storage_options) if gcs.is_gcs(root) else \
            _LocalStore(os.path.abspath(path))
        self.path = path
        self._stale_after_s = float(stale_after_s)
        self._holder: Optional[Holder] = None
        self._token = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.lost = False

    def acquire(self) -> None:
        """Takes the lock (or a stale one, with a warning); RunLockedError if a live run has it."""
        me = Holder.me()
        for _ in range(3):
            current = self._store.read()
            if current is None:
                token = self._store.create(me.to_json())
                if token is not None:
                    break
                continue  # another run created it first: look at it again
            text, seen = current
            holder = Holder.parse(text)
            reason = "its content is not a lock" if holder is None else \
                holder.gone(self._stale_after_s)
            if reason is None:
                raise RunLockedError(
                    f"Checkpoint directory {self.path.rsplit('/', 1)[0]} is in use by another "
                    f"training run ({holder.describe()}). Stop that run or use another "
                    "checkpoint_dir; a lock whose holder has died is taken over after "
                    f"training.lock_stale_s={self._stale_after_s:g} s without a heartbeat.")
            logging.warning("Taking over the run lock %s: %s (it was held by %s).", self.path,
                            reason, holder.describe() if holder else "?")
            token = self._store.replace(me.to_json(), seen)
            if token is not None:
                break
        else:
            raise RunLockedError(f"Could not take the run lock {self.path}: other runs keep "
                                 "taking it at the same time.")
        self._holder, self._token = me, token
        self._thread = threading.Thread(target=self._beat, name="run_lock_heartbeat", daemon=True)
        self._thread.start()
        logging.info("Took the run lock %s.", self.path)

    def _beat(self) -> None:
        """Refreshes the heartbeat every quarter of the staleness limit."""
        while not self._stop.wait(self._stale_after_s / 4):
            holder = dataclasses.replace(self._holder, heartbeat=time.time())
            try:
                token = self._store.replace(holder.to_json(), self._token)
            except Exception as e:  # noqa: BLE001 -- storage hiccup: the next beat retries
                logging.warning("Could not refresh the run lock %s: %s", self.path, e)
                continue
            if token is None:
                self.lost = True
                logging.error("The run lock %s was taken over by another run; this run's "
                              "checkpoints would overwrite its steps.", self.path)
                return
            self._holder, self._token = holder, token

    def release(self, timeout_s: float = 10.0) -> None:
        """Stops the heartbeat and removes the lock if this run still holds it, waiting at most
        `timeout_s` for the storage (a lock left behind goes stale and is taken over)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread = None
        if self.lost:
            return
        done = threading.Event()

        def delete():
            try:
                self._store.delete(self._token)
            except Exception as e:  # noqa: BLE001 -- reported below as a leftover
                logging.warning("Could not remove the run lock %s: %s", self.path, e)
            done.set()

        threading.Thread(target=delete, name="run_lock_release", daemon=True).start()
        if not done.wait(timeout_s):
            logging.warning("Removing the run lock %s did not finish within %g s; it will go "
                            "stale and be taken over.", self.path, timeout_s)
