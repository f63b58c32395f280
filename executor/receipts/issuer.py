"""Where receipts are made and signed: one per finished job, chained, batch-signed, kept in the outbox.

`ReceiptIssuer.issue()` numbers the receipt (seq, and prev = the previous
receipt's leaf hash) and stages it; at the end of the event-loop turn every
staged receipt is signed with one Ed25519 signature over a Merkle root
(`BatchSigner`), written to the outbox with one write(), and only then handed
back, so a job sends its receipt only once it is on disk. The publisher is woken.
A receipt is encoded once: its canonical JSON (hashed for its leaf) is spliced into
its outbox line, and `issue_encoded()` hands a reply those same bytes.

Waiting for the end of the turn pays only when other jobs may stage in it. A job that
says it is `alone` (the only one the node runs, so nothing else can stage before the
turn ends) has its batch, with anything already staged, signed and written at once:
two event-loop turns fewer on its reply path, the same receipt, the same write-before-
reply order.

Receipts fail closed. If the outbox cannot write the batch (full disk, EIO,
read-only), every job of the batch gets `ReceiptsUnavailable` instead of a
receipt, and the chain is rolled back to the last receipt on disk: those
numbers were never sent to a client, written, or published, so the next
receipt takes the first of them and the chain on disk has no gap (a gap would
look like a lost receipt to an auditor). While the outbox is unwritable, `issue()`
refuses at once and the node refuses new jobs (`durable`); it resumes by itself
when the outbox's probe finds room. A job cancelled while its receipt is staged
still has it written: the chain never skips a number it handed out.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from typing import Any

import msgspec
import structlog

from executor.receipts.outbox import Outbox, OutboxUnwritable
from executor.tokens import TokenCounter, mismatch
from protocol.announcements import Pricing
from protocol.errors import InternalError, LloomError, ReceiptsUnavailable
from protocol.estimate import estimate_prompt_tokens, estimate_tokens, tools_text
from protocol.identity import Identity
from protocol.trust import Endorsement
from protocol.messages import ChatRequest, Usage
from protocol.receipts import (
    DOMAIN,
    Outcome,
    Receipt,
    ReceiptProof,
    ReceiptUsage,
    SignedReceipt,
    canonical,
    merkle,
)
from protocol.status import ReceiptsStatus

log = structlog.get_logger(logger_name=__name__)


class BatchSigner:
    """Signs leaves in batches: one signature over the Merkle root of a batch, a path for each leaf."""

    def __init__(self, identity: Identity) -> None:
        self._identity = identity
        self.batches = 0
        self.signed = 0

    def sign(self, leaves: list[bytes]) -> list[ReceiptProof]:
        root, paths = merkle(leaves)
        sig = self._identity.sign(DOMAIN + root)
        self.batches += 1
        self.signed += len(leaves)
        return [ReceiptProof(root.hex(), path, sig) for path in paths]


class _Staged:
    __slots__ = ("body", "fut", "leaf", "receipt")

    def __init__(self, receipt: Receipt, body: bytes, leaf: bytes, fut: asyncio.Future[tuple[SignedReceipt, bytes]]) -> None:
        self.receipt = receipt
        self.body = body  # the receipt's canonical JSON: hashed for the leaf, and spliced into its line
        self.leaf = leaf
        self.fut = fut


_encode = msgspec.json.Encoder().encode


def signed_line(body: bytes, proof: ReceiptProof, endorsement: bytes) -> bytes:
    """A signed receipt's JSON (its outbox line, and what a reply carries) from the receipt's canonical
    bytes, already made for its leaf hash: the receipt is encoded once. Decodes as `SignedReceipt`
    (key order is free in JSON); `endorsement` is `,"endorsement":{...}` or empty."""
    return b'{"receipt":' + body + b',"proof":' + _encode(proof) + endorsement + b"}"


class ReceiptIssuer:
    def __init__(
        self,
        identity: Identity,
        executor_id: str,
        outbox: Outbox,
        *,
        pricing: Callable[[str], Pricing] = lambda _model: Pricing(),
        on_issue: Callable[[int], None] = lambda _seq: None,
        counter: TokenCounter | None = None,
        mismatch_tolerance: float = 0.1,
        endorsement: Endorsement | None = None,
    ) -> None:
        # An operator's endorsement of our key, attached to every receipt (outside what is signed).
        self.endorsement = endorsement
        self._counter = counter
        self._tolerance = mismatch_tolerance
        self.mismatches = 0
        self.identity = identity
        self.executor_id = executor_id
        self.outbox = outbox
        self._pricing = pricing
        self._on_issue = on_issue
        self._signer = BatchSigner(identity)
        self._seq = outbox.last_seq
        self._prev = outbox.last_leaf
        self._staged: list[_Staged] = []  # numbered this loop turn, signed and written at its end
        self.refused = 0  # jobs refused at admission while receipts could not be written
        self.failed = 0  # jobs whose receipt could not be written (answered with ReceiptsUnavailable)

    @property
    def durable(self) -> bool:
        """Whether receipts can be written now (else billable jobs are refused)."""
        return self.outbox.durable

    def unavailable(self, executor_id: str | None = None) -> ReceiptsUnavailable:
        """The typed error a job gets while receipts cannot be written."""
        return ReceiptsUnavailable(
            f"executor {self.executor_id} cannot record usage receipts durably ({self.outbox.error}); it takes no"
            " billable jobs until it can: retry on another executor",
            executor_id=executor_id or self.executor_id,
        )

    def status(self) -> ReceiptsStatus:
        outbox = self.outbox
        oldest = outbox.oldest_waiting_ms()
        since = outbox.unwritable_since
        return ReceiptsStatus(
            issued=outbox.last_seq, unpublished=outbox.waiting, mismatches=self.mismatches, durable=outbox.durable,
            error=outbox.error, unwritable_for_s=None if since is None else round(time.time() - since, 3),
            refused=self.refused, failed=self.failed, in_memory=len(outbox.window), memory_window=outbox.memory_window,
            oldest_waiting_age_s=None if oldest is None else round(max(0.0, time.time() - oldest / 1000), 3),
        )  # fmt: skip

    @property
    def signer(self) -> BatchSigner:
        return self._signer

    def usage(self, job_id: str, request: ChatRequest, reported: Usage | None, text: str, chunks: int) -> ReceiptUsage:
        """What to bill: the backend's report when there is one, checked against a local count.

        Counting costs ~10 µs a job with tiktoken, so a backend's report is checked as
        often as `[tokens] verify` says; without a report, counting is the only source.
        """
        local_prompt = local_completion = None
        method = "estimate"
        exact = False
        has_report = reported is not None and not reported.estimated
        if self._counter is not None and (not has_report or self._counter.should_verify(job_id)):
            prompt_count = self._counter.count_messages(request.model, request.messages, tools=tools_text(request))
            local_prompt, method = prompt_count.tokens, prompt_count.method
            # Images or tool definitions: part of the count is a guess, not comparable with the backend's.
            exact = not prompt_count.estimated
            local_completion = self._counter.count_text(request.model, text).tokens
        if has_report:
            assert reported is not None
            off = local_prompt is not None and method != "estimate" and exact and (
                mismatch(reported.prompt_tokens, local_prompt, self._tolerance)
                or mismatch(reported.completion_tokens, local_completion or 0, self._tolerance)
            )  # fmt: skip
            if off:
                self.mismatches += 1
                log.warning("token count mismatch", model=request.model, reported=reported.prompt_tokens,
                            counted=local_prompt, method=method)  # fmt: skip
            return ReceiptUsage(
                prompt_tokens=reported.prompt_tokens,
                completion_tokens=reported.completion_tokens,
                total_tokens=reported.prompt_tokens + reported.completion_tokens,
                counted_by="backend",
                local_prompt_tokens=local_prompt,
                local_completion_tokens=local_completion,
                mismatch=off,
            )
        # No report (a stream cut short, or a backend that sends none): our own count.
        prompt = local_prompt if local_prompt is not None else estimate_prompt_tokens(request)
        if local_completion is None or method == "estimate":
            # A streamed chunk is one token on every server we know; the text heuristic is worse.
            local_completion = chunks if chunks else estimate_tokens(text)
        return ReceiptUsage(
            prompt_tokens=prompt,
            completion_tokens=local_completion,
            total_tokens=prompt + local_completion,
            counted_by=method,
            local_prompt_tokens=local_prompt,
            local_completion_tokens=local_completion,
        )

    async def issue(
        self,
        *,
        job_id: str,
        client: str | None,
        model: str,
        backend: str,
        outcome: Outcome,
        finish_reason: str | None,
        usage: ReceiptUsage,
        started_at_ms: int,
        ttft_ms: int | None,
        request: bytes,
        response_text: str,
        cached: bool = False,
        signed: bytes | None = None,
    ) -> SignedReceipt:
        """`signed`: what `response_sha256` hashes when it is not the text alone (protocol/verify.py
        `signed_answer`)."""
        return (await self._stage(job_id=job_id, client=client, model=model, backend=backend, outcome=outcome,
                                  finish_reason=finish_reason, usage=usage, started_at_ms=started_at_ms,
                                  ttft_ms=ttft_ms, request=request, response_text=response_text, cached=cached,
                                  signed=signed))[0]  # fmt: skip

    async def issue_encoded(self, *, alone: bool = False, **job: Any) -> msgspec.Raw:
        """As `issue()`, but the signed receipt as the JSON its outbox line holds, for a reply to
        carry as it is (`msgspec.Raw`): a reply does not encode the receipt a second time.

        `alone`: no other job can stage a receipt this turn, so it is signed and written now."""
        return msgspec.Raw((await self._stage(alone=alone, **job))[1])

    async def _stage(
        self,
        *,
        job_id: str,
        client: str | None,
        model: str,
        backend: str,
        outcome: Outcome,
        finish_reason: str | None,
        usage: ReceiptUsage,
        started_at_ms: int,
        ttft_ms: int | None,
        request: bytes,
        response_text: str,
        cached: bool = False,
        signed: bytes | None = None,
        alone: bool = False,
    ) -> tuple[SignedReceipt, bytes]:
        if not self.outbox.durable:  # fail closed: nothing is numbered, nothing billed
            self.failed += 1
            raise self.unavailable()
        pricing = self._pricing(model)
        self._seq += 1
        receipt = Receipt(
            executor_id=self.executor_id,
            executor_key=self.identity.public_key,
            seq=self._seq,
            prev=self._prev,
            job_id=job_id,
            client=client,
            model=model,
            backend=backend,
            outcome=outcome,
            finish_reason=finish_reason,
            usage=usage,
            pricing=pricing,
            cost=pricing.cost(usage.prompt_tokens, usage.completion_tokens),
            started_at_ms=started_at_ms,
            finished_at_ms=time.time_ns() // 1_000_000,
            ttft_ms=ttft_ms,
            request_sha256=hashlib.sha256(request).hexdigest(),
            response_sha256=hashlib.sha256(response_text.encode() if signed is None else signed).hexdigest(),
            cached=cached,
        )
        body = canonical(receipt)
        leaf = hashlib.sha256(b"\x00" + body).digest()  # protocol/receipts.py leaf_hash, on bytes made once
        self._prev = leaf.hex()  # the chain is fixed now, before any await
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[SignedReceipt, bytes]] = loop.create_future()
        if alone:
            # Everything staged before it goes too, in order; a flush already scheduled finds nothing left.
            self._staged.append(_Staged(receipt, body, leaf, fut))
            self._flush()
            return fut.result()  # done either way: the receipt, or the batch's error
        if not self._staged:
            loop.call_soon(self._flush)
        self._staged.append(_Staged(receipt, body, leaf, fut))
        return await fut

    def _flush(self) -> None:
        """Sign the turn's receipts, write them with one write(), then hand them to their jobs."""
        staged, self._staged = self._staged, []
        if not staged:  # an `alone` job flushed them already
            return
        try:
            proofs = self._signer.sign([s.leaf for s in staged])
            signed = [SignedReceipt(s.receipt, proof, self.endorsement) for s, proof in zip(staged, proofs, strict=True)]
            # Once a batch (it may be replaced at run time): the same bytes in every line.
            endorsement = b"" if self.endorsement is None else b',"endorsement":' + _encode(self.endorsement)
            lines = [signed_line(s.body, proof, endorsement) for s, proof in zip(staged, proofs, strict=True)]
            self.outbox.write([(sr, s.leaf.hex()) for sr, s in zip(signed, staged, strict=True)], lines=lines)
        except Exception as e:
            # Nothing of this batch is on disk: roll the chain back to what is (see the module docstring).
            self._seq, self._prev = self.outbox.last_seq, self.outbox.last_leaf
            self.failed += len(staged)
            err: LloomError = self.unavailable() if isinstance(e, OutboxUnwritable) else InternalError(
                "the job's receipt could not be made; details are in the executor's log")  # fmt: skip
            if not isinstance(e, OutboxUnwritable):
                log.exception("signing or writing a receipt batch failed")
            for s in staged:
                if not s.fut.done():
                    s.fut.set_exception(err)
                    s.fut.exception()  # a cancelled job's future may never be awaited: no "never retrieved"
            return
        for s, sr, line in zip(staged, signed, lines, strict=True):
            if not s.fut.done():  # a job cancelled meanwhile: its receipt is kept, not sent
                s.fut.set_result((sr, line))
            self._on_issue(sr.receipt.seq)
