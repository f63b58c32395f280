"""Where receipts are made and signed: one per finished job, chained, batch-signed, kept in the outbox.

`ReceiptIssuer.issue()` numbers the receipt (seq, and prev = the previous
receipt's leaf hash), waits for the `BatchSigner` (which signs every receipt of
the current event-loop turn with one Ed25519 signature over a Merkle root),
appends it to the outbox and wakes the publisher. The job then sends it with
its result.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable

import structlog

from executor.receipts.outbox import Outbox
from executor.tokens import TokenCounter, mismatch
from protocol.announcements import Pricing
from protocol.estimate import estimate_tokens
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
    leaf_hash,
    merkle,
)

log = structlog.get_logger(logger_name=__name__)


class BatchSigner:
    """Signs leaves in batches: everything asked for in one loop turn shares one signature."""

    def __init__(self, identity: Identity) -> None:
        self._identity = identity
        self._pending: list[tuple[bytes, asyncio.Future[ReceiptProof]]] = []
        self.batches = 0
        self.signed = 0

    async def sign(self, leaf: bytes) -> ReceiptProof:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[ReceiptProof] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((leaf, fut))
        return await fut

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        root, paths = merkle([leaf for leaf, _ in batch])
        sig = self._identity.sign(DOMAIN + root)
        self.batches += 1
        self.signed += len(batch)
        for (_, fut), path in zip(batch, paths, strict=True):
            if not fut.done():
                fut.set_result(ReceiptProof(root.hex(), path, sig))


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
        has_report = reported is not None and not reported.estimated
        if self._counter is not None and (not has_report or self._counter.should_verify(job_id)):
            prompt_count = self._counter.count_messages(request.model, request.messages)
            local_prompt, method = prompt_count.tokens, prompt_count.method
            local_completion = self._counter.count_text(request.model, text).tokens
        if has_report:
            assert reported is not None
            off = local_prompt is not None and method != "estimate" and (
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
        prompt = local_prompt if local_prompt is not None else sum(estimate_tokens(m.content) for m in request.messages)
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
    ) -> SignedReceipt:
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
            response_sha256=hashlib.sha256(response_text.encode()).hexdigest(),
            cached=cached,
        )
        leaf = leaf_hash(receipt)
        self._prev = leaf.hex()  # the chain is fixed now, before any await
        signed = SignedReceipt(receipt, await self._signer.sign(leaf), self.endorsement)
        self.outbox.append(signed, leaf.hex())
        self._on_issue(receipt.seq)
        return signed
