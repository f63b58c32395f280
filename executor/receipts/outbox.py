"""The receipts outbox: every receipt on local disk until JetStream has acknowledged it.

`receipts.jsonl` is append-only, one signed receipt per line. `write()` puts a
signed batch into the file with one write() before any of its replies may leave
(it survives the process being killed; `sync_async()` fsyncs every `sync_interval`
in a worker thread, or `write()` each batch with `fsync_each_batch`, for the machine). A write that fails (full
disk, EFBIG, EIO, read-only fs) is cut back to the last whole batch and raises
`OutboxUnwritable`: none of that batch's receipts reaches disk, a client, or the
stream, and the outbox says it is not `durable` (the node then refuses billable
jobs) until a probe in `sync()` finds it writable again. So the file only ever
holds receipts whose jobs were answered with them, numbered without gaps.
A torn last line (a crash mid-write on an older version, a power loss) is cut
off when the outbox opens, and logged.

`acked` holds the highest seq up to which JetStream has acknowledged every
receipt, replaced atomically. After a restart, everything above that mark is
published again; the stream's de-duplication drops what had in fact arrived.
The disk is the buffer for receipts waiting for JetStream: only the oldest
`memory_window` of them are held in memory (`window`); the rest are read back
from the file, in order, as acknowledgements make room (`entry`). Receipts travel
to JetStream in batches; `sent` records each batch's seq range as it is formed,
so after a restart the same batches go out again and a batch JetStream had in
fact stored is dropped as a duplicate rather than stored twice.
Once everything is acknowledged and the file has grown past `compact_bytes`, it
is rotated (`receipts.jsonl.1`, replacing the previous one) and the chain's
position kept in `chain`, so a restart reads only recent lines.
One outbox, one writer: an `Outbox` holds an exclusive flock on `lock` in its
directory while open (the kernel drops it when the process dies), so a second
executor pointed at the same directory is refused with `OutboxInUse` instead of
numbering a second chain into the same file.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import structlog

from protocol.receipts import Receipt, SignedReceipt, leaf_hash, signed_receipt_decoder

log = structlog.get_logger(logger_name=__name__)
_encode = msgspec.json.Encoder().encode


class OutboxInUse(RuntimeError):
    """Another running executor holds this outbox directory."""


def _lock(directory: Path) -> int:
    """Hold `directory/lock` exclusively (released by closing the fd, or by the process dying)."""
    fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        held = os.pread(fd, 200, 0).decode(errors="replace").strip()
        os.close(fd)
        raise OutboxInUse(
            f"the receipts outbox {directory} is in use by another running executor ({held or 'holder unknown'});"
            " two executors on one outbox would write two chains into it. Give each executor its own"
            " [node] id, or its own [receipts] outbox_dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
    return fd


class OutboxUnwritable(RuntimeError):
    """Receipts could not be written durably: the batch was not kept, and the outbox refuses more until it can."""


class Pending(msgspec.Struct):
    """A receipt not yet acknowledged: its exact line and its de-duplication id."""

    executor_id: str
    line: bytes
    msg_id: str  # the leaf hash, hex
    at_ms: int  # when its job finished: how long it has waited for JetStream


# `entry()` for a receipt that waits on disk while the memory window is full.
NOT_LOADED = Pending("", b"", "", 0)


class Outbox:
    def __init__(
        self,
        directory: Path,
        *,
        compact_bytes: int = 16 << 20,
        memory_window: int = 4096,
        fsync_each_batch: bool = False,
        probe_bytes: int = 64 << 10,
        write: Callable[[int, bytes | memoryview], int] = os.write,
        fsync: Callable[[int], None] = os.fsync,
    ) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock(directory)
        self._path = directory / "receipts.jsonl"
        self._acked_path = directory / "acked"
        # Where the chain continues from once acknowledged lines have been compacted away.
        self._chain_path = directory / "chain"
        self._sent_path = directory / "sent"
        self._sent_fd: int | None = None
        # Once everything is acknowledged and the file is this big, it is rotated to
        # receipts.jsonl.1 (the previous one dropped): restarts read only what is recent.
        self.compact_bytes = compact_bytes
        self.memory_window = max(1, memory_window)
        self.fsync_each_batch = fsync_each_batch
        # While unwritable, `sync()` asks the file system for this much room (and gives it back):
        # jobs resume when a batch of their receipts would fit again, not at the first free byte.
        self.probe_bytes = probe_bytes
        self._write = write  # os.write; tests inject a failing one
        self._fsync = fsync  # os.fsync; tests inject a slow one
        self.acked_seq = self._read_acked()
        self._written_mark = self.acked_seq
        # The oldest waiting receipts, oldest first (dict order is seq order); the rest wait on disk
        # from `_spill` = (first seq not in memory, its offset in the file) on.
        self.window: dict[int, Pending] = {}
        self._spill: tuple[int, int] | None = None
        self.waiting = 0  # receipts not acknowledged, in memory or on disk
        self.last_seq = 0  # of the last receipt durably written (the chain continues from it)
        self.last_leaf = ""
        self._size = 0  # bytes of receipts.jsonl that hold whole, written batches
        self._torn = False  # bytes past _size may be in the file (a failed write not yet cut back)
        self.error: str | None = None  # why receipts cannot be written now (None: they can)
        self.unwritable_since: float | None = None  # wall-clock time it began
        self._fd: int | None = None  # opened on the first write
        self._dirty = False  # written since the last fsync
        self._load()

    @property
    def durable(self) -> bool:
        return self.error is None

    def _read_acked(self) -> int:
        try:
            return int(self._acked_path.read_text().strip() or 0)
        except FileNotFoundError:
            return 0
        except ValueError:
            log.warning("unreadable acked mark; republishing everything (duplicates are dropped)")
            return 0

    def _load(self) -> None:
        try:
            seq, leaf = self._chain_path.read_text().split()
            self.last_seq, self.last_leaf = int(seq), leaf
        except FileNotFoundError:
            pass
        except ValueError:
            log.error("unreadable chain file; the chain restarts from the outbox lines", file=str(self._chain_path))
        try:
            f = open(self._path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            return
        last: Receipt | None = None
        offset = 0
        with f:
            for number, line in enumerate(f, 1):  # streamed: memory holds the window, not the file
                if not line.endswith(b"\n"):
                    self._repair(offset, len(line), number)
                    break
                start, offset = offset, offset + len(line)
                if not line.strip(b"\n\x00 "):
                    continue
                try:
                    r = signed_receipt_decoder.decode(line).receipt
                except (msgspec.DecodeError, msgspec.ValidationError):
                    # Mid-file, only an older version's torn write followed by more can do this.
                    log.error("skipping an unreadable outbox line", file=str(self._path), line=number)
                    continue
                if r.seq >= self.last_seq:
                    last = r
                    self.last_seq = r.seq
                if r.seq > self.acked_seq:
                    self._keep(r.seq, start, lambda line=line, r=r: Pending(r.executor_id, line[:-1], leaf_hash(r).hex(),
                                                                          r.finished_at_ms))  # fmt: skip
        self._size = offset
        if last is not None:
            self.last_leaf = leaf_hash(last).hex()

    def _repair(self, offset: int, torn: int, number: int) -> None:
        """Cut a torn last line off (a crash or a full disk mid-write): its receipt never reached a client."""
        log.warning("cut a torn last line off the receipts outbox", file=str(self._path), line=number,
                    torn_bytes=torn, kept_bytes=offset)  # fmt: skip
        try:
            os.truncate(self._path, offset)
        except OSError as e:
            self._torn = True  # cut before the next write; until then nothing is written
            self._fail(f"cannot repair the torn outbox {self._path}: {e}")

    def _keep(self, seq: int, offset: int, pending: Callable[[], Pending]) -> None:
        """Count a waiting receipt; hold it in memory if it is among the oldest `memory_window`."""
        if seq in self.window:  # a seq written twice (an older version's reuse): the later line wins
            self.window[seq] = pending()
            return
        self.waiting += 1
        if self._spill is None:
            if len(self.window) < self.memory_window:
                self.window[seq] = pending()
            else:
                self._spill = (seq, offset)

    def write(self, batch: list[tuple[SignedReceipt, str]], *, lines: list[bytes] | None = None) -> None:
        """Write a signed batch (receipt, leaf hash hex) with one write(), before any of its replies leave.
        `lines`: the batch's receipts already encoded (one per receipt, without the newline).

        All or nothing: a write that fails is cut back to the last whole batch and raises
        `OutboxUnwritable`; the outbox is then not `durable` until a probe finds it writable.
        """
        if self.error is not None:
            raise OutboxUnwritable(self.error)
        if lines is None:
            lines = [_encode(signed) for signed, _ in batch]
        data = b"\n".join(lines) + b"\n"
        try:
            fd = self._open()
            view = memoryview(data)
            while view:  # a regular file takes it all at once; a full disk takes part, then raises
                view = view[self._write(fd, view) :]
            if self.fsync_each_batch:
                os.fsync(fd)
        except OSError as e:
            self._cut_back()
            self._fail(f"writing receipts to {self._path} failed: {e}")
            raise OutboxUnwritable(self.error) from e
        offset = self._size
        for (signed, leaf), line in zip(batch, lines, strict=True):
            r = signed.receipt
            self._keep(r.seq, offset, lambda line=line, r=r, leaf=leaf: Pending(r.executor_id, line, leaf,
                                                                                  r.finished_at_ms))  # fmt: skip
            offset += len(line) + 1
        self._size = offset
        self._dirty = not self.fsync_each_batch
        last = batch[-1]
        self.last_seq, self.last_leaf = last[0].receipt.seq, last[1]

    def _open(self) -> int:
        if self._fd is None:
            self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        if self._torn:
            os.ftruncate(self._fd, self._size)
            self._torn = False
        return self._fd

    def _cut_back(self) -> None:
        """Drop what a failed write left past the last whole batch (a partial line, or whole lines
        of receipts whose jobs will now fail): what the file holds was answered with, nothing else."""
        try:
            if self._fd is not None:
                os.ftruncate(self._fd, self._size)
        except OSError as e:
            self._torn = True
            log.error("could not cut a failed outbox write back; retried before the next write", error=str(e))

    def _fail(self, why: str) -> None:
        if self.error is None:
            self.unwritable_since = time.time()
            log.error("receipts cannot be written durably; refusing billable jobs until they can",
                      outbox=str(self.directory), error=why)  # fmt: skip
        self.error = why

    def probe(self) -> bool:
        """While unwritable: is there room for a batch again (and a torn tail cut)? Then resume."""
        if self.error is None:
            return True
        try:
            fd = self._open()
            view = memoryview(bytes(self.probe_bytes))  # what a batch's write would need, by the same write()
            while view:
                view = view[self._write(fd, view) :]
            os.ftruncate(fd, self._size)
            os.fsync(fd)
        except OSError as e:
            self._cut_back()  # what of the probe went in
            log.debug("receipts outbox still not writable", error=str(e))
            return False
        since = self.unwritable_since or time.time()
        log.warning("receipts outbox writable again; taking jobs", outbox=str(self.directory), error_was=self.error,
                    unwritable_s=round(time.time() - since, 3))  # fmt: skip
        self.error = self.unwritable_since = None
        return True

    def entry(self, seq: int, *, force: bool = False) -> Pending | None:
        """Waiting receipt `seq`: from memory, read back from disk when there is room, `NOT_LOADED`
        when there is none yet, None when it is acknowledged (or was never written). `force` reads
        it back even past the window (a previous run's batch larger than the room, nothing in flight)."""
        found = self.window.get(seq)
        if found is not None:
            return found
        spill = self._spill
        if spill is None or seq < spill[0] or seq > self.last_seq:
            return None
        self._refill(seq if force else 0)
        found = self.window.get(seq)
        if found is not None:
            return found
        spill = self._spill
        return NOT_LOADED if spill is not None and seq >= spill[0] else None

    def _refill(self, through: int = 0) -> None:
        """Read waiting receipts back from disk into the window, oldest first, in chunks (and at
        least through seq `through`)."""
        room = self.memory_window - len(self.window)
        if self._spill is None or room < max(1, self.memory_window // 4) and self.window and through < self._spill[0]:
            return
        seq, offset = self._spill
        with open(self._path, "rb") as f:
            f.seek(offset)
            while (len(self.window) < self.memory_window or seq <= through) and offset < self._size:
                line = f.readline()
                if not line.endswith(b"\n"):
                    break
                offset += len(line)
                try:
                    r = signed_receipt_decoder.decode(line).receipt
                except (msgspec.DecodeError, msgspec.ValidationError):
                    continue  # blank, or reported when the outbox was opened
                if r.seq > self.acked_seq:
                    self.window[r.seq] = Pending(r.executor_id, line[:-1], leaf_hash(r).hex(), r.finished_at_ms)
                seq = r.seq + 1
        self._spill = (seq, offset) if offset < self._size else None

    def first_waiting(self) -> int | None:
        """The oldest seq not acknowledged."""
        if self.window:
            return next(iter(self.window))
        return self._spill[0] if self._spill is not None else None

    def oldest_waiting_ms(self) -> int | None:
        """When the job of the oldest receipt not acknowledged finished (ms since the epoch)."""
        if not self.window:
            self._refill()
        return next(iter(self.window.values())).at_ms if self.window else None

    def lines(self, seqs: set[int]) -> dict[int, Pending]:
        """The receipts `seqs` as written, read back from disk (the rotated file too): for healing."""
        found: dict[int, Pending] = {}
        for path in (self._path.with_name(self._path.name + ".1"), self._path):
            try:
                f = open(path, "rb")  # noqa: SIM115 - closed below
            except FileNotFoundError:
                continue
            with f:
                for line in f:
                    if not line.endswith(b"\n"):
                        break  # a torn tail (cut when the outbox opened, or a write in progress)
                    try:
                        r = signed_receipt_decoder.decode(line).receipt
                    except (msgspec.DecodeError, msgspec.ValidationError):
                        continue  # a torn line, reported when the outbox was opened
                    if r.seq in seqs:
                        found[r.seq] = Pending(r.executor_id, line[:-1], leaf_hash(r).hex(), r.finished_at_ms)
        return found

    def acked(self, seq: int) -> None:
        if self.window.pop(seq, None) is not None:
            self.waiting -= 1
        if not self.window and self._spill is None:
            self.waiting = 0  # nothing in memory, nothing on disk past it (a count an old file's repeated seq threw off)

    def recorded_batches(self) -> list[tuple[int, int]]:
        """The seq ranges of the batches a previous run formed and sent, not yet acknowledged, oldest first."""
        try:
            text = self._sent_path.read_text()
        except FileNotFoundError:
            return []
        batches = []
        for line in text.splitlines():
            try:
                first, last = map(int, line.split())
            except ValueError:
                continue  # a torn last line: its batch is formed again
            first = max(first, self.acked_seq + 1)
            if first <= last:
                batches.append((first, last))
        return batches

    def record_batch(self, first: int, last: int) -> None:
        """Note that receipts first..last leave as one message (before it leaves: a plain write)."""
        if self._sent_fd is None:
            self._sent_fd = os.open(self._sent_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        os.write(self._sent_fd, f"{first} {last}\n".encode())

    def sync(self) -> None:
        """fsync what was written (power-loss durability), probe an unwritable outbox, persist the
        acked mark; for a caller off the event loop's hot path (close, tests). The publisher uses
        `sync_async`, which does the same with the blocking calls in a thread."""
        if self.error is not None:
            self.probe()
        fd, mark = self._sync_begin()
        self._sync_end(mark, *_sync_files(self._fsync, fd, self._acked_path, mark))

    async def sync_async(self) -> None:
        """`sync()` with its file system calls (the fsync, the acked mark's write and rename) in a
        worker thread: on a busy disk they take milliseconds, which on the event loop would stall
        every reply meanwhile. Durability is the same: replies wait for their batch's write(), not
        for this fsync, which runs every sync interval as before. Only the publisher's task calls
        it, one at a time; the outbox's state is read and changed on the loop only."""
        if self.error is not None:
            self.probe()  # only while unwritable: the failure path may block
        fd, mark = self._sync_begin()
        if fd is None and mark is None:
            self._sync_end(None, None, None)
            return
        self._sync_end(mark, *(await asyncio.to_thread(_sync_files, self._fsync, fd, self._acked_path, mark)))

    def _sync_begin(self) -> tuple[int | None, int | None]:
        """What to sync: the fd if written since the last fsync (marked clean now: a write from here
        on marks it dirty again, for the next round), and the acked mark if it moved."""
        fd = None
        if self._dirty and self._fd is not None and self.error is None:
            fd, self._dirty = self._fd, False
        # The mark only moves over a contiguous prefix: a hole must be republished.
        first = self.first_waiting()
        mark = first - 1 if first is not None else self.last_seq
        return fd, (mark if mark > self._written_mark else None)

    def _sync_end(self, mark: int | None, fsync_error: OSError | None, mark_error: OSError | None) -> None:
        if fsync_error is not None:  # what was written may not survive a power loss: stop taking jobs
            self._fail(f"fsync of {self._path} failed: {fsync_error}")
        if mark_error is not None:  # the receipts themselves are safe; a restart republishes more, that is all
            log.warning("could not record the outbox's acknowledged mark", error=str(mark_error))
        elif mark is not None:
            self._written_mark = max(self._written_mark, mark)
            self.acked_seq = max(self.acked_seq, mark)
        if not self.waiting and self.error is None and self._size >= self.compact_bytes:
            try:
                self._compact()
            except OSError as e:
                log.warning("could not compact the receipts outbox", error=str(e))

    def _compact(self) -> None:
        """Rotate a fully acknowledged file; the chain's position is kept in `chain`."""
        _write_atomically(self._chain_path, f"{self.last_seq} {self.last_leaf}")
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        os.replace(self._path, self._path.with_name(self._path.name + ".1"))
        self._size = 0
        self._close_sent()
        self._sent_path.unlink(missing_ok=True)  # every batch in it is acknowledged
        log.info("outbox compacted", last_seq=self.last_seq)

    def close(self) -> None:
        self.sync()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._close_sent()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # the next executor may use it now
            self._lock_fd = -1

    def _close_sent(self) -> None:
        if self._sent_fd is not None:
            os.close(self._sent_fd)
            self._sent_fd = None


def _sync_files(
    fsync: Callable[[int], None], fd: int | None, acked_path: Path, mark: int | None
) -> tuple[OSError | None, OSError | None]:
    """The blocking part of a sync (no outbox state touched: it may run in a thread)."""
    fsync_error = mark_error = None
    if fd is not None:
        try:
            fsync(fd)
        except OSError as e:
            fsync_error = e
    if mark is not None:
        try:
            _write_atomically(acked_path, str(mark))
        except OSError as e:
            mark_error = e
    return fsync_error, mark_error


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
