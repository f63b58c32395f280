"""Whether a reply is genuine: signed by the executor it names, for the request sent, about the text received.

Every result (`ChatResponse`, `StreamEnd`, `EmbeddingResponse`, `TextResponse`) carries
the executor's signed receipt. `ReplyVerifier.check_identity` accepts a reply only if

- it has a receipt whose Merkle path and Ed25519 signature verify (protocol/receipts.py);
- the receipt names the executor the reply names (and, for a direct job, the one asked),
  the job id the client sent, and the client id it sent;
- `request_sha256` is the hash of the exact payload bytes the client published;
- the receipt's key is the key bound to that executor id (the catalogue's binding:
  the first key that announced the id; else the key of the first verified reply from
  it) and is trusted by the client's `Trust` (any key on an open network).

`check_response` then compares `response_sha256` with the hash of what arrived: the
content (unary), the joined chunk texts (streams, at the end), the JSON of the vectors
(embeddings); for a chat answer with reasoning or tool calls, `signed_answer` of them all
(so a relay cannot swap the calls an agent will run). Any failure raises `ReplyForged` with the reason; the caller decides what
that means (unary calls ignore the reply and keep waiting, see protocol/client.py).

Signature checks dominate the cost (~50 µs); receipts signed in one batch share a root
and signature, so roots already checked are remembered (bounded).
"""

from __future__ import annotations

import hashlib
from collections import Counter, OrderedDict
from collections.abc import Callable

from protocol.errors import ReplyForged
from protocol.identity import verify
from protocol.receipts import ReceiptInvalid, SignedReceipt, verify_receipt
from protocol.trust import Trust

# Bounds on what a verifier remembers: checked signatures, and ids first seen in replies.
MAX_REMEMBERED_ROOTS = 1024
MAX_BINDINGS = 10_000


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def signed_answer(content: str, reasoning: str | None = None, tool_calls: bytes | None = None) -> bytes:
    """What a chat receipt's `response_sha256` is the hash of: the answer text alone when that is
    all there is (so plain answers hash as they always did); else the text, the reasoning text and
    the tool calls' JSON (unary: the calls; streams: every piece, in order), apart by NUL markers."""
    if not reasoning and not tool_calls:
        return content.encode()
    return b"\x00".join((content.encode(), b"reasoning", (reasoning or "").encode(), b"tool_calls", tool_calls or b""))


class ReplyVerifier:
    """Checks replies for one client; counts what it refused by reason in `forgeries`."""

    def __init__(self, trust: Trust, *, bound_key: Callable[[str], str | None] = lambda _id: None) -> None:
        self.trust = trust
        # The catalogue's binding of executor ids to keys, when the client runs one.
        self._bound_key = bound_key
        self._first_seen: dict[str, str] = {}  # executor id -> key of its first verified reply
        self._roots: OrderedDict[tuple[str, bytes, str], None] = OrderedDict()
        self.forgeries: Counter[str] = Counter()

    def check_identity(
        self,
        receipt: SignedReceipt | None,
        *,
        executor_id: str,
        job_id: str,
        client: str | None,
        request_sha256: str,
        target: str | None = None,
    ) -> SignedReceipt:
        """The reply's receipt, if it proves the reply came from the executor it names for this request."""
        if receipt is None:
            self._refuse("no_receipt", f"reply from {executor_id!r} carries no receipt")
        assert receipt is not None
        r = receipt.receipt
        try:
            verify_receipt(receipt, signature_ok=self._signature_ok)
        except ReceiptInvalid as e:
            self._refuse("bad_receipt", f"reply from {executor_id!r}: {e}")
        if r.executor_id != executor_id or (target is not None and r.executor_id != target):
            asked = f" (asked {target!r})" if target is not None else ""
            self._refuse("wrong_executor", f"reply names {executor_id!r}{asked}, its receipt {r.executor_id!r}")
        if r.job_id != job_id:
            self._refuse("wrong_job", f"receipt is for job {r.job_id}, not {job_id}")
        if r.client != client:
            self._refuse("wrong_client", f"receipt bills client {r.client!r}, not {client!r}")
        if r.request_sha256 != request_sha256:
            self._refuse("wrong_request", "receipt is for another request (request hash differs)")
        bound = self._bound_key(r.executor_id) or self._first_seen.get(r.executor_id)
        if bound is not None and bound != r.executor_key:
            self._refuse("impostor", f"executor id {r.executor_id!r} belongs to key {bound}, not {r.executor_key}")
        if not self.trust.trusts(r.executor_key, receipt.endorsement):
            self._refuse("untrusted", f"executor key {r.executor_key} ({r.executor_id!r}) is not trusted")
        if bound is None and len(self._first_seen) < MAX_BINDINGS:
            self._first_seen[r.executor_id] = r.executor_key
        return receipt

    def check_response(self, receipt: SignedReceipt, response: bytes) -> None:
        """That the receipt's response hash is the hash of `response` (what the caller got)."""
        if receipt.receipt.response_sha256 != sha256_hex(response):
            self._refuse("wrong_response", "the text received is not the text the executor signed for")

    def _refuse(self, reason: str, message: str) -> None:
        self.forgeries[reason] += 1
        raise ReplyForged(message)

    def _signature_ok(self, key: str, data: bytes, sig: str) -> bool:
        seen = (key, data, sig)
        if seen in self._roots:
            self._roots.move_to_end(seen)
            return True
        if not verify(key, data, sig):
            return False
        self._roots[seen] = None
        if len(self._roots) > MAX_REMEMBERED_ROOTS:
            self._roots.popitem(last=False)
        return True
