"""Usage receipts: what they say, their canonical bytes, how they are signed and checked.

A receipt is what an executor is paid by, so it must verify on any machine and
betray any change. Its canonical bytes are its JSON with keys sorted and no
whitespace (prices and cost as decimal strings, times as integer ms: no floats).

Signing is batched: every receipt finished in the same event-loop turn becomes
a leaf of one Merkle tree (RFC 6962 hashing: leaf = SHA-256(0x00 || canonical),
node = SHA-256(0x01 || left || right)), and the executor signs the root once
(Ed25519, its nkey, over `DOMAIN || root`). Each receipt carries its own path
to the root, so it verifies alone, and signing costs one signature per turn
instead of one per job.

Each executor numbers its receipts (`seq`, from 1, across restarts) and links
each to the previous one (`prev`, the previous leaf hash), so whoever holds the
stream can tell a missing, duplicated or replayed receipt (`check_chain`).

On the wire (JetStream and the outbox file alike) signed receipts are JSON
documents, one per line; a JetStream message carries a batch of consecutive
receipts of one executor, so storing them costs one message, not one per job
(`receipt_lines` splits one).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from decimal import Decimal
from typing import Literal

import msgspec

from protocol.announcements import Pricing
from protocol.identity import verify
from protocol.trust import Endorsement

DOMAIN = b"lloom-receipts-v1:"
Outcome = Literal["completed", "cancelled", "failed"]


class ReceiptUsage(msgspec.Struct, frozen=True, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    # Where the billed figures come from: "backend" (its usage report), or the
    # local count's method ("tiktoken:o200k_base", "estimate", ...) when it sent none.
    counted_by: str
    # The executor's own count, which checks the backend's (None when not counted).
    local_prompt_tokens: int | None = None
    local_completion_tokens: int | None = None
    mismatch: bool = False


class Receipt(msgspec.Struct, frozen=True, kw_only=True):
    v: int = 1
    executor_id: str
    executor_key: str
    seq: int
    prev: str  # hex leaf hash of receipt seq-1 of this executor; "" for the first
    job_id: str
    client: str | None
    model: str
    backend: str
    outcome: Outcome
    finish_reason: str | None
    usage: ReceiptUsage
    pricing: Pricing
    cost: Decimal  # USD
    started_at_ms: int
    finished_at_ms: int
    ttft_ms: int | None
    request_sha256: str  # of the request payload exactly as received
    response_sha256: str  # of the generated text (all chunks joined, for streams)
    cached: bool = False  # answered from the executor's response cache


class ReceiptProof(msgspec.Struct, frozen=True):
    root: str  # hex
    path: list[str]  # siblings from leaf to root, each "L<hex>" (sibling on the left) or "R<hex>"
    sig: str  # base64url Ed25519 signature of DOMAIN || root


class SignedReceipt(msgspec.Struct, frozen=True, omit_defaults=True):
    receipt: Receipt
    proof: ReceiptProof
    # An operator's endorsement of `receipt.executor_key` (protocol/trust.py), outside
    # what is signed: it is checked on its own, against the operator's key.
    endorsement: Endorsement | None = None


class ReceiptInvalid(Exception):
    """Why a receipt fails verification."""


signed_receipt_decoder = msgspec.json.Decoder(SignedReceipt)


def receipt_lines(data: bytes) -> list[bytes]:
    """The signed receipts (encoded) in a receipts message or file: one per non-blank line."""
    return [line for line in data.split(b"\n") if line.strip()]


def canonical(receipt: Receipt) -> bytes:
    return msgspec.json.encode(receipt, order="sorted")


def leaf_hash(receipt: Receipt) -> bytes:
    return hashlib.sha256(b"\x00" + canonical(receipt)).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def merkle(leaves: list[bytes]) -> tuple[bytes, list[list[str]]]:
    """The root over `leaves` and each leaf's path to it (an odd node is promoted unchanged)."""
    paths: list[list[str]] = [[] for _ in leaves]
    members: list[list[int]] = [[i] for i in range(len(leaves))]  # leaves under each node
    level = list(leaves)
    while len(level) > 1:
        nxt, nxt_members = [], []
        for i in range(0, len(level) - 1, 2):
            left, right = level[i], level[i + 1]
            step = "R" + right.hex()  # once per node, not once per leaf under it
            for leaf in members[i]:
                paths[leaf].append(step)
            step = "L" + left.hex()
            for leaf in members[i + 1]:
                paths[leaf].append(step)
            nxt.append(_node(left, right))
            nxt_members.append(members[i] + members[i + 1])
        if len(level) % 2:
            nxt.append(level[-1])
            nxt_members.append(members[-1])
        level, members = nxt, nxt_members
    return level[0], paths


def root_from_path(leaf: bytes, path: list[str]) -> bytes:
    h = leaf
    for step in path:
        sibling = bytes.fromhex(step[1:])
        h = _node(sibling, h) if step[0] == "L" else _node(h, sibling)
    return h


def verify_receipt(
    signed: SignedReceipt,
    *,
    trusted_keys: Iterable[str] | None = None,
    signature_ok: Callable[[str, bytes, str], bool] = verify,
) -> bytes:
    """Check `signed`; return its leaf hash, or raise `ReceiptInvalid` saying what is wrong.

    `signature_ok(key, signed bytes, sig)` checks the root's signature; a caller that sees
    many receipts of one batch may pass one that remembers roots it already checked."""
    r = signed.receipt
    if trusted_keys is not None and r.executor_key not in set(trusted_keys):
        raise ReceiptInvalid(f"signed by {r.executor_key}, which is not a trusted executor key")
    leaf = leaf_hash(r)
    try:
        root = root_from_path(leaf, signed.proof.path)
    except ValueError as e:
        raise ReceiptInvalid(f"malformed proof path: {e}") from e
    if root.hex() != signed.proof.root:
        raise ReceiptInvalid("contents changed: the receipt's hash does not lead to the signed root")
    if not signature_ok(r.executor_key, DOMAIN + root, signed.proof.sig):
        raise ReceiptInvalid("bad signature: the root was not signed by the executor's key")
    expected = r.pricing.cost(r.usage.prompt_tokens, r.usage.completion_tokens)
    if r.cost != expected:
        raise ReceiptInvalid(f"cost {r.cost} does not match its tokens and prices ({expected})")
    if r.usage.total_tokens != r.usage.prompt_tokens + r.usage.completion_tokens:
        raise ReceiptInvalid("total_tokens is not prompt_tokens + completion_tokens")
    return leaf


def check_chain(receipts: Iterable[tuple[SignedReceipt, bytes]]) -> list[str]:
    """Problems in each executor's sequence: a start other than 1, gaps, duplicates, broken links, key changes.

    Takes (receipt, leaf hash) pairs, e.g. from `verify_receipt`, in any order.
    """
    by_key: dict[str, dict[int, tuple[SignedReceipt, bytes]]] = {}
    problems: list[str] = []
    keys_of: dict[str, str] = {}
    for signed, leaf in receipts:
        r = signed.receipt
        seen = by_key.setdefault(r.executor_key, {})
        if r.seq in seen:
            same = seen[r.seq][1] == leaf
            problems.append(f"{r.executor_id}: receipt {r.seq} appears twice" + ("" if same else " with different contents"))
            continue
        seen[r.seq] = (signed, leaf)
        if keys_of.setdefault(r.executor_id, r.executor_key) != r.executor_key:
            problems.append(f"{r.executor_id}: receipts signed by two different keys")
    for chain in by_key.values():
        seqs = sorted(chain)
        name = chain[seqs[0]][0].receipt.executor_id
        for a, b in zip(seqs, seqs[1:], strict=False):
            if b != a + 1:
                problems.append(f"{name}: receipts {a + 1}..{b - 1} are missing")
            elif chain[b][0].receipt.prev != chain[a][1].hex():
                problems.append(f"{name}: receipt {b} does not link to receipt {a}")
        if seqs[0] == 1 and chain[1][0].receipt.prev != "":
            problems.append(f"{name}: receipt 1 links to a predecessor")
        elif seqs[0] != 1:
            # Every chain starts at 1; a later start hides the receipts before it (or invents a history).
            problems.append(f"{name}: the chain starts at receipt {seqs[0]}, not 1 (receipts 1..{seqs[0] - 1} are missing)")
    return problems
