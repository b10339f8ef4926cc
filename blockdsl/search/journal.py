"""The search's default storage: Optuna's journal file, made safe against a kill at any instant.

Optuna's `JournalFileBackend` appends one JSON line per operation under a lock. Two of its
failure modes wedge or break a study when a worker is SIGKILLed while appending:

- Its default lock is a symlink `NAME.journal.lock` whose target is the journal path as
  given. A relative path resolves inside the lock's own folder, so the link dangles; the
  grace-period check `os.stat`s the link, fails, and retries without sleeping: a dead
  holder's lock is never broken and the next worker spins on a core forever.
  Here the lock is `fcntl.flock` on a separate file (`NAME.journal.flock`): the kernel
  releases it when its holder dies, however it dies, so there is nothing to go stale and
  no grace period to wait out. flock is per machine (on NFS it is not reliable: use an RDB
  storage there). Without fcntl (Windows) Optuna's symlink lock is used, on an absolute
  path so that its grace period does work.
- A kill mid-append leaves a partial last line. Readers skip it, but the next append goes
  after the fragment and makes one undecodable line in the middle, and from then on every
  read fails. Here every append, under the lock (so no live writer can be mid-line), first
  checks that the file ends with a newline and otherwise cuts the fragment off, keeping a
  backup of the original bytes. Only the last line is ever repaired automatically: damage
  elsewhere is reported as the user's problem, with the file and line, and left as it is.

A file that is not a journal at all (a folder, binary data, some other text) is rejected
before Optuna reads it, with its name, and is never written to.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

from blockdsl.search.optuna_glue import journal_lock_base

BaseJournalFileLock = journal_lock_base()

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

# Every record Optuna writes starts like this (json.dumps of a dict whose first key is op_code,
# compact separators); a fragment cut off by a kill is a prefix of it or starts with it.
RECORD_START = b'{"op_code":'
FLOCK_SUFFIX = ".flock"
OLD_LOCK_SUFFIX = ".lock"  # Optuna's symlink lock, used by earlier versions of blockdsl
OLD_LOCK_GRACE = 30.0  # seconds: Optuna's own grace period for its lock
MAX_LINE = 64 << 20  # a journal record is kilobytes; a longer "line" is not a journal


class JournalError(Exception):
    """The file given as a journal cannot be used; the message names it (and the line)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.cli_message = message


def _say(message: str) -> None:
    print(f"blockdsl: {message}", file=sys.stderr, flush=True)


class FlockLock(BaseJournalFileLock):
    """An exclusive `flock` on a lock file, released by the kernel when its holder dies.

    flock conflicts between two open file descriptions even within one process, so threads
    of one process (a trial and its heartbeat) exclude each other too; the mutex only keeps
    them from sharing this object's descriptor. The lock file is never deleted: unlinking
    it while another process waits on the old inode would let two holders in.
    """

    def __init__(self, path: str):
        self.path = path
        self._fd: int | None = None
        self._mutex = threading.Lock()

    def acquire(self) -> bool:
        self._mutex.acquire()
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
        except BaseException:
            self._mutex.release()
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
        finally:
            self._mutex.release()


def make_lock(path: str) -> BaseJournalFileLock:
    return FlockLock(path + FLOCK_SUFFIX) if fcntl is not None else JournalFileSymlinkLock(path)


@dataclass
class Scan:
    """What `scan` found: the byte offset just past the last complete record, the number of
    complete records, and the file's size (a torn tail is `size - good_end` bytes)."""

    good_end: int
    records: int
    size: int

    @property
    def torn(self) -> bool:
        return self.size > self.good_end


def _looks_like_record_start(b: bytes) -> bool:
    n = min(len(b), len(RECORD_START))
    return b[:n] == RECORD_START[:n]


def _show(b: bytes) -> str:
    text = b[:40].decode("utf-8", "replace")
    return repr(text + ("..." if len(b) > 40 else ""))


def check_path(path: str) -> None:
    """A path that exists must be a regular file this process can read and append to."""
    if not os.path.lexists(path):
        return
    if os.path.isdir(path):
        raise JournalError(f"{path} is a folder, not a journal file: pass a file path (a new "
                           "one starts a new study) or a database URL")
    if not os.path.isfile(path):
        raise JournalError(f"{path} is not a regular file (a device, pipe or dangling link): "
                           "pass a journal file or a database URL")
    for mode, what in ((os.R_OK, "read"), (os.W_OK, "write")):
        if not os.access(path, mode):
            raise JournalError(f"{path}: permission denied (cannot {what} it)")


def scan(path: str) -> Scan:
    """Check that `path` is an Optuna journal, every line a JSON record but perhaps the last.

    Raises `JournalError` for anything else, naming the file and the first bad line. A last
    line that is incomplete (no newline) or undecodable but starts like a record is a torn
    tail: reported in the result, not raised.
    """
    size = os.path.getsize(path)
    good_end = records = 0
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below; OSError must be located
    except OSError as e:
        raise JournalError(f"cannot read {path}: {e.strerror}") from None
    with f:
        head = f.read(len(RECORD_START))
        if head and not _looks_like_record_start(head):
            binary = b"\0" in head or not _utf8(head)
            what = f"binary data {head!r}" if binary else f"text {_show(head)}"
            raise JournalError(f"{path} is not an Optuna journal (it starts with {what}): "
                               "pass a journal that blockdsl search wrote, a new file name, "
                               "or a database URL")
        f.seek(0)
        lineno = 0
        while True:
            line = f.readline(MAX_LINE)
            if not line:
                break
            lineno += 1
            last = f.tell() >= size
            complete = line.endswith(b"\n")
            problem = None
            if not complete and not last:
                problem = f"line longer than {MAX_LINE >> 20} MB"
            elif complete:
                try:
                    rec = json.loads(line)
                    if not isinstance(rec, dict) or not isinstance(rec.get("op_code"), int):
                        problem = "a JSON value that is no journal record"
                except (ValueError, UnicodeDecodeError) as e:
                    problem = f"undecodable ({type(e).__name__})"
            if problem is None and complete:
                good_end += len(line)
                records += 1
                continue
            if last and _looks_like_record_start(line):
                return Scan(good_end, records, size)  # torn tail
            problem = problem or "not a record"
            if records == 0 and lineno == 1:
                raise JournalError(f"{path} is not an Optuna journal (line 1: {problem}, "
                                   f"{_show(line)}): pass a journal that blockdsl search "
                                   "wrote, a new file name, or a database URL")
            raise JournalError(
                f"{path}:{lineno}: damaged journal record ({problem}: "
                f"{_show(line)}); only a torn last line is repaired automatically: restore the "
                f"file from a backup, or keep its first {lineno - 1} lines")
    return Scan(good_end, records, size)


def _utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start >= len(b) - 3  # a multi-byte character cut off by the read
    return True


def _backup_path(path: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        cand = f"{path}.bak-{stamp}" + (f"-{i}" if i else "")
        try:
            fd = os.open(cand, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return cand
    raise JournalError(f"cannot create a backup next to {path}: too many backups")


def repair_tail(path: str, good_end: int, records: int, say: Callable[[str], None] = _say) -> str:
    """Cut the journal back to `good_end` bytes, the original kept as `NAME.bak-<time>`.

    Only under the journal's lock: then no live writer is mid-line, so bytes past the last
    newline can only be a dead writer's fragment. Returns the backup's path.
    """
    backup = _backup_path(path)
    with open(path, "rb") as src, open(backup, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(good_end)
        f.flush()
        os.fsync(f.fileno())
    say(f"{path}: its last record was cut off by a killed worker; removed the {size - good_end} "
        f"byte fragment after record {records} (the original is kept as {backup})")
    return backup


def _last_newline_end(f: Any, size: int) -> int:
    """Offset just past the file's last newline (0 if it has none)."""
    pos = size
    while pos > 0:
        n = min(1 << 16, pos)
        pos -= n
        f.seek(pos)
        i = f.read(n).rfind(b"\n")
        if i >= 0:
            return pos + i + 1
    return 0


def remove_stale_symlink_lock(path: str, say: Callable[[str], None] = _say) -> None:
    """Earlier versions used Optuna's symlink lock `NAME.journal.lock`, which a killed worker
    leaves behind (dangling when the journal path was relative). It is no lock of ours, so it
    cannot block us; a dangling or old one is removed so that it does not mislead anyone."""
    lock = path + OLD_LOCK_SUFFIX
    if not os.path.islink(lock):
        return
    try:
        dangling = not os.path.exists(lock)
        age = time.time() - os.lstat(lock).st_mtime
        if dangling or age > OLD_LOCK_GRACE:
            os.unlink(lock)
            say(f"removed the stale lock {lock} left by a killed worker of an earlier version")
    except OSError:
        pass  # removed by another worker meanwhile


class JournalBackend(JournalFileBackend):
    """`JournalFileBackend` on an absolute path with the flock lock and torn-tail repair."""

    def __init__(self, path: str, say: Callable[[str], None] = _say):
        # The real path: the lock file sits next to the journal itself, so that every name
        # of one journal (a symlink, a linked folder) takes the same lock. Two locks for one
        # file would let a worker "repair" the line another is appending at that moment.
        path = os.path.realpath(path)
        self._say = say
        super().__init__(path, make_lock(path))

    def repair(self) -> None:
        """Under the lock: cut off a fragment a killed writer left at the end."""
        path = self._file_path
        size = os.path.getsize(path)
        if size == 0:
            return
        with open(path, "rb") as f:
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return
            end = _last_newline_end(f, size)
        records = sum(1 for _ in _lines(path, end)) if end else 0
        repair_tail(path, end, records, self._say)

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        self._lock.acquire()
        try:
            self.repair()
            data = "\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n"
            with open(self._file_path, "ab") as f:
                f.write(data.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
        finally:
            self._lock.release()


def _lines(path: str, end: int) -> Any:
    with open(path, "rb") as f:
        while f.tell() < end and f.readline():
            yield None


def open_backend(path: str, say: Callable[[str], None] = _say) -> JournalBackend:
    """Check the file, repair a torn tail under the lock, and open it.

    A file that is not a journal raises `JournalError` and is left untouched (not even
    created: only a path that does not exist yet becomes a new, empty journal).
    """
    path = os.path.abspath(path)
    check_path(path)  # on the name given: a dangling link is refused, not followed
    path = os.path.realpath(path)  # one lock per journal, whatever its name (see JournalBackend)
    if not os.path.exists(path):
        parent = os.path.dirname(path)
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as e:
            raise JournalError(f"cannot create the folder {parent} for {path}: "
                               f"{e.strerror}") from None
        if not os.access(parent, os.W_OK):
            raise JournalError(f"cannot create {path}: permission denied")
    else:
        remove_stale_symlink_lock(path, say)
        s = scan(path)
        if s.torn:
            # Perhaps a live worker is mid-append: only under the lock is a partial line a
            # dead one's fragment. Scan again there; repair what is still torn.
            lock = make_lock(path)
            lock.acquire()
            try:
                s = scan(path)
                if s.torn:
                    repair_tail(path, s.good_end, s.records, say)
            finally:
                lock.release()
    return JournalBackend(path, say)
