"""The receipts outbox: every receipt on local disk until JetStream has acknowledged it.

`receipts.jsonl` is append-only, one signed receipt per line, written before the
job's reply leaves (a plain write: it survives the process being killed; `sync()`
makes it survive the machine too, and runs off the request path). `acked` holds
the highest seq up to which JetStream has acknowledged every receipt, replaced
atomically. After a restart, everything above that mark is published again; the
stream's de-duplication (Nats-Msg-Id = the receipt's leaf hash) drops what had
in fact arrived. The last line also gives back the chain's seq and prev.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import BinaryIO

import msgspec
import structlog

from protocol.receipts import SignedReceipt, leaf_hash, signed_receipt_decoder

log = structlog.get_logger(logger_name=__name__)
_encode = msgspec.json.Encoder().encode


class Pending(msgspec.Struct):
    """A receipt not yet acknowledged: its exact line and its de-duplication id."""

    executor_id: str
    line: bytes
    msg_id: str  # the leaf hash, hex


class Outbox:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._path = directory / "receipts.jsonl"
        self._acked_path = directory / "acked"
        self.acked_seq = self._read_acked()
        self._written_mark = self.acked_seq
        self.pending: dict[int, Pending] = {}
        self.last_seq = 0
        self.last_leaf = ""
        self._load()
        self._file: BinaryIO | None = None  # opened on the first append
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
            if r.seq > self.last_seq:
                self.last_seq, self.last_leaf = r.seq, leaf
            if r.seq > self.acked_seq:
                self.pending[r.seq] = Pending(r.executor_id, line, leaf)

    def append(self, signed: SignedReceipt, leaf: str) -> None:
        """Write `signed` (whose leaf hash is `leaf`) before its reply leaves.

        Lines written in one event-loop turn reach the kernel together, at the end of
        the turn: before any reply of that turn leaves (replies go out from nats.py's
        flusher, which runs later), with one write() for the lot.
        """
        if self._file is None:
            self._file = open(self._path, "ab")  # noqa: SIM115 - owned until close()
        line = _encode(signed)
        self._file.write(line + b"\n")
        if not self._dirty_turn:
            self._dirty_turn = True
            try:
                asyncio.get_running_loop().call_soon(self._flush_turn)
            except RuntimeError:  # no loop (tools, tests): write through
                self._flush_turn()
        self._dirty = True
        seq = signed.receipt.seq
        self.last_seq = max(self.last_seq, seq)
        self.pending[seq] = Pending(signed.receipt.executor_id, line, leaf)

    def _flush_turn(self) -> None:
        self._dirty_turn = False
        if self._file is not None:
            self._file.flush()  # into the kernel now: a killed process loses nothing

    def acked(self, seq: int) -> None:
        self.pending.pop(seq, None)

    def sync(self) -> None:
        """fsync what was written (power-loss durability) and persist the acked mark; call it now and then."""
        if self._dirty and self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._dirty = False
        # The mark only moves over a contiguous prefix: a hole must be republished.
        mark = (min(self.pending) - 1) if self.pending else self.last_seq
        if mark > self._written_mark:
            tmp = self._acked_path.with_suffix(".tmp")
            tmp.write_text(str(mark))
            os.replace(tmp, self._acked_path)
            self._written_mark = self.acked_seq = mark

    def close(self) -> None:
        self._flush_turn()
        self.sync()
        if self._file is not None:
            self._file.close()
            self._file = None
