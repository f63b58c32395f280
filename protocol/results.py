"""Signed results of queued jobs: what an executor stores in `LLOOM_RESULTS`, and how a client checks it.

Anyone who can write the bucket could otherwise plant any answer (or any error) for any
job id. So the executor that files a result wraps the reply (a `ChatResponse` or an
`ErrorReply`, exactly as it would have sent it) in a `SignedResult`: its public key and an
Ed25519 signature over `DOMAIN || job id || 0x00 || reply bytes`. The job id is inside the
signature, so a genuine result cannot be copied under another job's key.

`open_result` is the client's side. It refuses, with `ForgedResult`, a value that is not
a signed envelope, a signature that does not verify, a key the caller does not trust (when
it gives a set of trusted keys), and for an answer with a receipt: a receipt that does not
verify, names another job or another key, does not hash the text returned, or (when the
caller knows what it submitted) does not hash the request sent.
"""

from __future__ import annotations

from collections.abc import Collection

import msgspec

from protocol.errors import ForgedResult
from protocol.identity import Identity, verify
from protocol.messages import ChatResponse, ErrorReply, encoder, unary_reply_decoder
from protocol.receipts import ReceiptInvalid, verify_receipt
from protocol.trust import Trust
from protocol.verify import sha256_hex, signed_answer

DOMAIN = b"lloom-result-v1:"


class SignedResult(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    v: int = 1
    job_id: str
    executor_key: str  # the public nkey (N...) of the executor that filed the result
    sig: str  # base64url Ed25519 signature of DOMAIN || job_id || 0x00 || reply
    reply: msgspec.Raw  # the ChatResponse or ErrorReply, as the executor encoded it


_decode = msgspec.json.Decoder(SignedResult).decode
_encode = msgspec.json.Encoder().encode


def _signed_bytes(job_id: str, reply: bytes) -> bytes:
    return DOMAIN + job_id.encode() + b"\x00" + reply


def seal_result(identity: Identity, job_id: str, reply: bytes) -> bytes:
    """The value an executor stores (and announces) for job `job_id`."""
    sig = identity.sign(_signed_bytes(job_id, reply))
    return _encode(SignedResult(job_id=job_id, executor_key=identity.public_key, sig=sig, reply=msgspec.Raw(reply)))


def open_result(
    data: bytes,
    job_id: str,
    *,
    request_sha256: str | None = None,
    trusted_keys: Collection[str] | None = None,
    trust: Trust | None = None,
) -> ChatResponse | ErrorReply:
    """The reply inside a stored result, once it is proven to come from an executor for this job.

    `trusted_keys`, when given, are the only executor keys accepted; else `trust` (a client's
    keyring: its executor keys, and those its operators endorsed) decides, when it is closed."""
    try:
        signed = _decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ForgedResult(f"the stored result of job {job_id} is not a signed result ({e})", job_id=job_id) from None
    reply = bytes(signed.reply)
    if signed.job_id != job_id:
        raise ForgedResult(f"the stored result of job {job_id} was signed for job {signed.job_id!r}", job_id=job_id)
    if not verify(signed.executor_key, _signed_bytes(job_id, reply), signed.sig):
        raise ForgedResult(f"the stored result of job {job_id} has a bad signature", job_id=job_id)
    if trusted_keys is not None and signed.executor_key not in trusted_keys:
        raise ForgedResult(f"the stored result of job {job_id} is signed by {signed.executor_key}, "
                           "which is not a trusted executor key", job_id=job_id)  # fmt: skip
    try:
        outcome = unary_reply_decoder.decode(reply)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ForgedResult(f"the stored result of job {job_id} is unreadable ({e})", job_id=job_id) from None
    if trusted_keys is None and trust is not None:
        receipt = outcome.receipt
        if not trust.trusts(signed.executor_key, receipt.endorsement if receipt is not None else None):
            raise ForgedResult(f"the stored result of job {job_id} is signed by {signed.executor_key}, which is"
                               " not in this client's keyring", job_id=job_id)  # fmt: skip
    if isinstance(outcome, ChatResponse):
        _check_receipt(outcome, job_id, signed.executor_key, request_sha256)
    return outcome


def _check_receipt(reply: ChatResponse, job_id: str, key: str, request_sha256: str | None) -> None:
    signed = reply.receipt
    if signed is None:
        return  # receipts are off on that executor; the envelope's signature still binds the answer
    try:
        verify_receipt(signed)
    except ReceiptInvalid as e:
        raise ForgedResult(f"the receipt in the result of job {job_id} is invalid: {e}", job_id=job_id) from None
    r = signed.receipt
    problem = None
    if r.job_id != job_id:
        problem = f"is for job {r.job_id!r}"
    elif r.executor_key != key:
        problem = "is signed by another key than the result"
    elif r.response_sha256 != sha256_hex(signed_answer(
            reply.content, reply.reasoning_content, encoder.encode(reply.tool_calls) if reply.tool_calls else None)):
        problem = "does not match the text returned"
    elif request_sha256 is not None and r.request_sha256 != request_sha256:
        problem = "is for another request than the one submitted"
    if problem is not None:
        raise ForgedResult(f"the receipt in the result of job {job_id} {problem}", job_id=job_id)
