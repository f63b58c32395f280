"""The OpenAI-compatible HTTP gateway: every executor of the network behind `/v1/chat/completions` & co.

A daemon shipped with the node (`lloom-gateway`, or in-process in `lloom-executor`'s
single-machine start). It depends on `protocol/` (the client, routing, catalogue,
receipts) and on `executor/config.py` only: never on jobs or backends.
"""
