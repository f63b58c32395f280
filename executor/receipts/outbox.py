"""The receipts outbox: every receipt on local disk until JetStream has acknowledged it.

`receipts.jsonl` is append-only, one signed receipt per line, written before the
job's reply leaves (a plain write: it survives the process being killed; `sync()`
makes it survive the machine too, and runs off the request path). `acked` holds
the highest seq up to which JetStream has acknowledged every receipt, replaced
atomically. After a restart, everything above that mark is published again; the
stream's de-duplication (Nats-Msg-Id = the receipt's leaf hash) drops what had
in fact arrived. The last line also gives back the chain's seq and prev.
Receipts travel to JetStream in batches, one message each, de-duplicated by a
hash over the batch; `sent` records each batch's seq range as it is formed, so
after a restart the same batches go out again and a batch JetStream had in
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
from pathlib import Path
from typing import BinaryIO

import msgspec
import structlog

from protocol.receipts import SignedReceipt, leaf_hash, signed_receipt_decoder

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


class Pending(msgspec.Struct):
    """A receipt not yet acknowledged: its exact line and its de-duplication id."""

    executor_id: str
    line: bytes
    msg_id: str  # the leaf hash, hex


class Outbox:
    def __init__(self, directory: Path, *, compact_bytes: int = 16 << 20) -> None:
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
        self.acked_seq = self._read_acked()
        self._written_mark = self.acked_seq
        self.pending: dict[int, Pending] = {}
        self.last_seq = 0
        self.last_leaf = ""
        self._load()
        self._file: BinaryIO | None = None  # opened (unbuffered) on the first write
        self._turn: list[bytes] = []  # lines appended in this event-loop turn, written at its end
        self._dirty = False
        self._dirty_turn = False

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
        if not self._path.exists():
            return
        with open(self._path, "rb") as f:
            lines = f.read().split(b"\n")
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                signed = signed_receipt_decoder.decode(line)
            except (msgspec.DecodeError, msgspec.ValidationError):
                # Only a torn last write (power loss) can do this; say so loudly.
                log.error("skipping an unreadable outbox line", file=str(self._path), line=number)
                continue
            r = signed.receipt
            leaf = leaf_hash(r).hex()
            if r.seq >= self.last_seq:
                self.last_seq, self.last_leaf = r.seq, leaf
            if r.seq > self.acked_seq:
                self.pending[r.seq] = Pending(r.executor_id, line, leaf)

    def append(self, signed: SignedReceipt, leaf: str) -> None:
        """Write `signed` (whose leaf hash is `leaf`) before its reply leaves.

        Lines written in one event-loop turn reach the kernel together, at the end of
        the turn: before any reply of that turn leaves (replies go out from nats.py's
        flusher, which runs later), with one write() for the lot.
        """
        line = _encode(signed)
        self._turn.append(line)
        if not self._dirty_turn:
            self._dirty_turn = True
            try:
                asyncio.get_running_loop().call_soon(self._flush_turn)
            except RuntimeError:  # no loop (tools, tests): write through
                self._flush_turn()
        self._dirty = True
        seq = signed.receipt.seq
        if seq > self.last_seq:
            self.last_seq, self.last_leaf = seq, leaf
        self.pending[seq] = Pending(signed.receipt.executor_id, line, leaf)

    def _flush_turn(self) -> None:
        """The turn's lines into the kernel with one write(): a killed process loses nothing."""
        self._dirty_turn = False
        if not self._turn:
            return
        if self._file is None:
            self._file = open(self._path, "ab", buffering=0)  # noqa: SIM115 - owned until close()
        lines, self._turn = self._turn, []
        data = b"\n".join(lines) + b"\n"
        view = memoryview(data)
        while view:  # a regular file takes it all at once; a full disk raises
            view = view[self._file.write(view) or 0 :]

    def lines(self, seqs: set[int]) -> dict[int, Pending]:
        """The receipts `seqs` as written, read back from disk (the rotated file too): for healing."""
        self._flush_turn()
        found: dict[int, Pending] = {}
        for path in (self._path.with_name(self._path.name + ".1"), self._path):
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            for line in data.split(b"\n"):
                if not line.strip():
                    continue
                try:
                    r = signed_receipt_decoder.decode(line).receipt
                except (msgspec.DecodeError, msgspec.ValidationError):
                    continue  # a torn line, reported when the outbox was opened
                if r.seq in seqs:
                    found[r.seq] = Pending(r.executor_id, line, leaf_hash(r).hex())
        return found

    def acked(self, seq: int) -> None:
        self.pending.pop(seq, None)

    def recorded_batches(self) -> list[list[int]]:
        """The pending receipts' batches as a previous run formed them (seqs, oldest first)."""
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
            seqs = [s for s in range(max(first, self.acked_seq + 1), last + 1) if s in self.pending]
            if seqs:
                batches.append(seqs)
        return batches

    def record_batch(self, first: int, last: int) -> None:
        """Note that receipts first..last leave as one message (before it leaves: a plain write)."""
        if self._sent_fd is None:
            self._sent_fd = os.open(self._sent_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(self._sent_fd, f"{first} {last}\n".encode())

    def sync(self) -> None:
        """fsync what was written (power-loss durability) and persist the acked mark; call it now and then."""
        if self._dirty and self._file is not None:
            self._flush_turn()
            os.fsync(self._file.fileno())
            self._dirty = False
        # The mark only moves over a contiguous prefix: a hole must be republished.
        mark = (min(self.pending) - 1) if self.pending else self.last_seq
        if mark > self._written_mark:
            _write_atomically(self._acked_path, str(mark))
            self._written_mark = self.acked_seq = mark
        if not self.pending and self._file is not None and self._file.tell() >= self.compact_bytes:
            self._compact()

    def _compact(self) -> None:
        """Rotate a fully acknowledged file; the chain's position is kept in `chain`."""
        assert self._file is not None
        _write_atomically(self._chain_path, f"{self.last_seq} {self.last_leaf}")
        self._file.close()
        self._file = None
        os.replace(self._path, self._path.with_name(self._path.name + ".1"))
        self._close_sent()
        self._sent_path.unlink(missing_ok=True)  # every batch in it is acknowledged
        log.info("outbox compacted", last_seq=self.last_seq)

    def close(self) -> None:
        self._flush_turn()
        self.sync()
        if self._file is not None:
            self._file.close()
            self._file = None
        self._close_sent()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # the next executor may use it now
            self._lock_fd = -1

    def _close_sent(self) -> None:
        if self._sent_fd is not None:
            os.close(self._sent_fd)
            self._sent_fd = None


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
