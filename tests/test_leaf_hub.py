"""A laptop joins a hub with one command: `lloom-executor --hub nats-leaf://HOST:PORT` (issue 19).

Real processes: a hub `nats-server` (JetStream, a leafnodes port) the test kills with
SIGKILL and starts again on the same ports; a laptop-side `lloom-executor` whose embedded
server is a leaf node of that hub, with the OpenAI test double (in this process) as its
backend; clients on the hub and on the laptop's local bus. Counted: jobs attempted /
completed / failed with a typed error / lost / run twice, receipts expected / stored /
duplicated, and where the receipts are stored (the laptop's own JetStream domain, never
the hub's as well). The secured hub (compose/nats/hub.conf) refuses wrong credentials
with a log line that says so, and an outsider leaf gets no more than the leaf role allows;
an nkey seed file, and a .creds file over TLS to an operator-mode hub, join too.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import nats
import nkeys
import pytest
from nats.js.api import StreamConfig

from executor.process.embedded_nats import EmbeddedNats, free_port
from protocol import subjects as subj
from protocol.client import LloomClient
from protocol.connection import NatsConnectOptions
from protocol.errors import LloomError
from protocol.routing import Specific
from tests.credentials import JwtChain, Pki
from tests.doubles.openai_double import OpenAIDouble
from tests.helpers.jobs import MODEL, ask
from tests.helpers.processes import Executor, StartExecutor
from tests.helpers.wait import eventually, within
from tests.test_receipts import stored_receipts

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

HUB_CONF = Path(__file__).resolve().parent.parent / "compose" / "nats" / "hub.conf"
LAPTOP = "laptop-1"
CALL_TIMEOUT_S = 15.0
LINK_S = 30.0  # bound on the leaf link coming (back) up: the leaf retries every second


class Hub:
    """A hub nats-server on fixed client and leafnode ports that the test can SIGKILL and restart."""

    def __init__(self, store: Path, conf: Path | None = None, env: dict[str, str] | None = None) -> None:
        self.port, self.leaf_port = free_port(), free_port()
        self.store, self.conf, self.env = store, conf, env
        self.server = self._make()

    def _make(self) -> EmbeddedNats:
        if self.conf is None:  # an open hub: JetStream of its own, leaf nodes welcome
            return EmbeddedNats(port=self.port, jetstream=True, store_dir=str(self.store),
                                conf_extra=f"leafnodes {{ port: {self.leaf_port} }}\n")  # fmt: skip
        args = ["-c", str(self.conf), "-sd", str(self.store)]
        return EmbeddedNats(port=self.port, extra_args=args, env={**(self.env or {}), "LLOOM_HUB_LEAF_PORT": str(self.leaf_port)})

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def leaf_url(self) -> str:
        return f"nats-leaf://127.0.0.1:{self.leaf_port}"

    async def crash_and_restart(self) -> None:
        self.server.kill()
        await self.server.stop()
        self.server = self._make()

    async def start(self) -> None:
        await self.server.start()


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[Hub]:
    h = Hub(tmp_path / "hub-js")
    await h.start()
    yield h
    await h.server.stop()


@pytest.fixture
async def backend() -> AsyncIterator[OpenAIDouble]:
    async with OpenAIDouble(models=[MODEL]) as d:
        yield d


def laptop_config(tmp_path: Path, backend: OpenAIDouble, **hub: str) -> Path:
    """The laptop's config; `hub` are [hub] keys (then its replies use the inbox its hub user may read)."""
    lines = "".join(f"{k} = {json.dumps(v)}\n" for k, v in hub.items())
    path = tmp_path / "laptop.toml"
    path.write_text(
        f'[llm_client]\nbackend = "openai_compatible"\nbase_url = "{backend.base_url}"\ntimeout_secs = 60\n\n'
        f'[node]\nid = "{LAPTOP}"\nembedded_nats_port = {free_port()}\nheartbeat_interval_secs = 0.2\n'
        + (f'\n[hub]\n{lines}\n[nats]\ninbox_prefix = "_INBOX_{LAPTOP}"\n' if lines else "")
    )
    return path


def joins(executor: Executor) -> int:
    return sum(1 for e in executor.events if e.get("event") == "joined hub")


@dataclass
class Tally:
    """How calls ended: ok, failed with a typed error (by code), lost (no answer within the deadline)."""

    attempted: int = 0
    completed: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    receipts: list[str] = field(default_factory=list)  # job ids of the receipts that came back

    async def run(self, client: LloomClient, n: int, **kw: object) -> None:
        for _ in range(n):
            self.attempted += 1
            try:
                async with asyncio.timeout(CALL_TIMEOUT_S + 5):
                    reply = await client.complete(ask(), **kw)  # type: ignore[arg-type]
            except LloomError as e:
                self.failed[e.code.value] = self.failed.get(e.code.value, 0) + 1
            except TimeoutError:
                self.lost += 1
            else:
                assert reply.executor_id == LAPTOP and reply.content
                assert reply.receipt is not None
                self.receipts.append(reply.receipt.receipt.job_id)
                self.completed += 1


async def serves_laptop(client: LloomClient) -> bool:
    catalog = await client.catalog()
    return any(e.executor_id == LAPTOP and MODEL in [m.name for m in e.models] for e in catalog.entries())


async def test_a_laptop_joins_a_hub_serves_its_clients_and_rides_out_a_hub_crash(
    start_executor: StartExecutor, tmp_path: Path, backend: OpenAIDouble, hub: Hub
) -> None:
    # The hub has a receipts stream of its own, on the same subjects: it must not get the laptop's.
    async with await nats.connect(hub.url) as nc:
        await nc.jetstream().add_stream(StreamConfig(name=subj.RECEIPTS_STREAM, subjects=[subj.RECEIPTS_ALL]))
    laptop = await start_executor("--config", str(laptop_config(tmp_path, backend)), "--hub", hub.leaf_url)
    local_url = await laptop.started()
    assert local_url.startswith("nats://127.0.0.1:")
    joined = await laptop.wait_for("joined hub", timeout=LINK_S)
    assert joined["hub"] == hub.leaf_url and str(joined["domain"]).startswith("lloom-leaf-")

    on_hub, on_laptop = Tally(), Tally()
    async with await LloomClient.connect(hub.url, timeout=CALL_TIMEOUT_S) as hub_client, \
            await LloomClient.connect(local_url, timeout=CALL_TIMEOUT_S) as local_client:  # fmt: skip
        # The laptop's model is in the hub's catalogue, and a hub client runs jobs on it.
        await eventually(lambda: serves_laptop(hub_client), timeout=LINK_S, what="the laptop in the hub's catalogue")
        await on_hub.run(hub_client, 5)
        await on_hub.run(hub_client, 3, route=Specific(MODEL))  # through the catalogue, to its direct subject
        await on_laptop.run(local_client, 5)
        assert (on_hub.completed, on_laptop.completed) == (8, 5)

        # A hub client keeps sending jobs, one after another, through the crash below.
        across, stop = Tally(), asyncio.Event()

        async def keep_sending() -> None:
            while not stop.is_set():
                await across.run(hub_client, 1)

        sender = asyncio.create_task(keep_sending())
        await eventually(lambda: across.completed >= 2, timeout=LINK_S, what="jobs across the link before the crash")
        before_crash = across.completed

        # The hub dies (SIGKILL) and comes back on the same ports; local jobs go on meanwhile.
        hub.server.kill()
        await laptop.wait_for("lost the hub link; the embedded server reconnects by itself, local clients are still served")
        await on_laptop.run(local_client, 5)
        await hub.crash_and_restart()
        await hub.start()
        await eventually(lambda: joins(laptop) >= 2, timeout=LINK_S, what="the laptop joined the hub again")
        await on_laptop.run(local_client, 5)
        await eventually(lambda: serves_laptop(hub_client), timeout=LINK_S, what="the laptop back in the catalogue")
        await on_hub.run(hub_client, 5)
        await on_hub.run(hub_client, 3, route=Specific(MODEL))
        await eventually(lambda: across.completed >= before_crash + 2, timeout=LINK_S,
                         what="the hub client's running jobs completing again after the crash")  # fmt: skip
        stop.set()
        await within(sender, "the last job across the crash", CALL_TIMEOUT_S + 10)

    assert laptop.proc.returncode is None  # a lost link never stopped the node
    for tally in (on_hub, on_laptop):
        assert (tally.failed, tally.lost) == ({}, 0)
    assert (on_hub.attempted, on_hub.completed, on_laptop.attempted, on_laptop.completed) == (16, 16, 15, 15)
    # Jobs sent while the hub died: each got its answer or a typed error, none was lost.
    assert across.lost == 0 and across.completed + sum(across.failed.values()) == across.attempted
    print(f"\nacross the hub crash: attempted {across.attempted}, completed {across.completed},"
          f" failed typed {across.failed}, lost {across.lost}")

    # Receipts: all in the laptop's own JetStream (its domain), each once; none in the hub's stream.
    async with await nats.connect(local_url) as nc:
        expected = set(on_hub.receipts + on_laptop.receipts + across.receipts)

        async def all_stored() -> bool:
            return {s.receipt.job_id for s in await stored_receipts(nc.jetstream())} >= expected

        await eventually(all_stored, timeout=LINK_S, what="every receipt in the laptop's stream")
        stored = [s.receipt.job_id for s in await stored_receipts(nc.jetstream())]
    assert len(expected) == 31 + across.completed and set(stored) >= expected  # none lost
    assert len(stored) == len(set(stored))  # no job id twice: none duplicated, none run twice
    # Every run at the backend has its one receipt (a job whose answer was lost in the crash too).
    assert backend.completed == len(stored)
    async with await nats.connect(hub.url) as nc:
        assert (await nc.jetstream().stream_info(subj.RECEIPTS_STREAM)).state.messages == 0


async def test_the_hub_can_neither_reach_the_laptops_jetstream_nor_put_receipts_in_it(
    start_executor: StartExecutor, tmp_path: Path, backend: OpenAIDouble, hub: Hub
) -> None:
    laptop = await start_executor("--config", str(laptop_config(tmp_path, backend)), "--hub", hub.leaf_url)
    local_url = await laptop.started()
    domain = str((await laptop.wait_for("joined hub", timeout=LINK_S))["domain"])
    async with await nats.connect(local_url) as local:
        # The laptop's receipts stream exists (the executor made it) and answers locally ...
        await eventually(lambda: local.jetstream().stream_info(subj.RECEIPTS_STREAM), timeout=10,
                         what="the laptop's receipts stream")  # fmt: skip
        async with await nats.connect(hub.url) as outsider:
            # ... but not across the link, even by its domain's own API prefix.
            with pytest.raises(nats.errors.NoRespondersError):
                await outsider.request(f"$JS.{domain}.API.STREAM.INFO.{subj.RECEIPTS_STREAM}", b"", timeout=2)
            with pytest.raises(nats.errors.NoRespondersError):
                await outsider.request(f"$JS.{domain}.API.STREAM.PURGE.{subj.RECEIPTS_STREAM}", b"", timeout=2)
            # A receipt published on the hub does not land in the laptop's stream.
            before = (await local.jetstream().stream_info(subj.RECEIPTS_STREAM)).state.messages
            await outsider.publish(subj.receipts_subject("forger"), b"{}")
            await outsider.flush()
            # The control: a plain subject published the same way does cross (so the link is up).
            sub = await local.subscribe("lloom.v1.catalog.query.probe")
            await local.flush()
            await eventually(lambda: _crosses(outsider, sub), timeout=LINK_S, what="a message across the link")
            assert (await local.jetstream().stream_info(subj.RECEIPTS_STREAM)).state.messages == before


async def _crosses(nc: nats.aio.client.Client, sub: nats.aio.subscription.Subscription) -> bool:
    await nc.publish("lloom.v1.catalog.query.probe", b"x")
    try:
        await sub.next_msg(timeout=0.2)
    except nats.errors.TimeoutError:
        return False
    return True


# -- a secured hub (compose/nats/hub.conf) -------------------------------------------------


@pytest.fixture
async def secure_hub(tmp_path: Path) -> AsyncIterator[tuple[Hub, str]]:
    """compose/nats/hub.conf with secrets made up for this run; yields the hub and the leaf's password."""
    env = dict(os.environ)
    passwords = {v: "pw" + secrets.token_hex(12) for v in (
        "LLOOM_NATS_ADMIN_PASSWORD", "LLOOM_NATS_EXECUTOR_1_PASSWORD", "LLOOM_NATS_ALICE_PASSWORD",
        "LLOOM_NATS_LAPTOP_1_PASSWORD", "LLOOM_NATS_GATEWAY_PASSWORD")}  # fmt: skip
    env.update(passwords)
    for var in ("LLOOM_NATS_EXECUTOR_2_NKEY", "LLOOM_NATS_BOB_NKEY"):
        seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
        env[var] = nkeys.from_seed(bytearray(seed)).public_key.decode()
    h = Hub(tmp_path / "hub-js", conf=HUB_CONF, env=env)
    await h.start()
    h.env = {**env, "alice": passwords["LLOOM_NATS_ALICE_PASSWORD"], "admin": passwords["LLOOM_NATS_ADMIN_PASSWORD"]}
    yield h, passwords["LLOOM_NATS_LAPTOP_1_PASSWORD"]
    await h.server.stop()


async def test_wrong_hub_credentials_are_a_clear_log_line_and_local_service_goes_on(
    start_executor: StartExecutor, env: dict[str, str], tmp_path: Path, backend: OpenAIDouble,
    secure_hub: tuple[Hub, str],
) -> None:
    hub, _ = secure_hub
    env["LAPTOP_HUB_PASSWORD"] = "not-the-password"
    config = laptop_config(tmp_path, backend, user=LAPTOP, password="${LAPTOP_HUB_PASSWORD}")
    laptop = await start_executor("--config", str(config), "--hub", hub.leaf_url)
    local_url = await laptop.started()
    refused = await laptop.wait_for("the hub refused this leaf's credentials", timeout=LINK_S)
    assert "Authorization Violation" in str(refused["error"]) and "not-the-password" not in "\n".join(laptop.lines)
    assert laptop.logged("joined hub") is None
    local = Tally()
    async with await LloomClient.connect(local_url, timeout=CALL_TIMEOUT_S) as client:
        await local.run(client, 3)
    assert (local.completed, local.failed, local.lost) == (3, {}, 0)


async def test_a_leaf_on_the_secured_hub_serves_jobs_routed_to_it_and_sees_no_other_jobs(
    start_executor: StartExecutor, env: dict[str, str], tmp_path: Path, backend: OpenAIDouble,
    secure_hub: tuple[Hub, str],
) -> None:
    hub, password = secure_hub
    env["LAPTOP_HUB_PASSWORD"] = password
    config = laptop_config(tmp_path, backend, user=LAPTOP, password="${LAPTOP_HUB_PASSWORD}")
    laptop = await start_executor("--config", str(config), "--hub", hub.leaf_url)
    local_url = await laptop.started()
    await laptop.wait_for("joined hub", timeout=LINK_S)
    alice = NatsConnectOptions(user="alice", password=hub.env["alice"], inbox_prefix="_INBOX_alice")  # type: ignore[index]
    tally = Tally()
    async with await nats.connect(local_url) as spy:
        # Someone on the laptop listens to every job subject: the hub sends it nothing.
        seen = await spy.subscribe("lloom.v1.complete.*")
        await spy.flush()
        async with await LloomClient.connect(hub.url, options=alice, timeout=CALL_TIMEOUT_S) as client:
            await eventually(lambda: serves_laptop(client), timeout=LINK_S, what="the laptop in the hub's catalogue")
            # A job for the model's subject (flushed: the hub has it), then jobs routed to the laptop:
            # had the first crossed the link, it would be there before the routed ones are answered.
            async with await nats.connect(hub.url, user="alice", password=alice.password) as raw:
                await raw.publish(subj.complete_subject(MODEL), b"{}")
                await raw.flush()
            await tally.run(client, 4, route=Specific(MODEL))  # routed to the laptop's direct subject
        await spy.flush()
        assert seen.pending_msgs == 0
    assert (tally.completed, tally.failed, tally.lost) == (4, {}, 0)


async def test_an_outsider_leaf_cannot_write_receipts_jetstream_or_an_executors_inbox_on_the_hub(
    start_executor: StartExecutor, env: dict[str, str], tmp_path: Path, backend: OpenAIDouble,
    secure_hub: tuple[Hub, str],
) -> None:
    """Anyone on the laptop's bus speaks through the leaf user: it gets no more than the leaf role."""
    hub, password = secure_hub
    env["LAPTOP_HUB_PASSWORD"] = password
    config = laptop_config(tmp_path, backend, user=LAPTOP, password="${LAPTOP_HUB_PASSWORD}")
    laptop = await start_executor("--config", str(config), "--hub", hub.leaf_url)
    local_url = await laptop.started()
    await laptop.wait_for("joined hub", timeout=LINK_S)
    async with await nats.connect(hub.url, user="admin", password=hub.env["admin"]) as admin:  # type: ignore[index]
        forbidden = ["_INBOX_executor-1.forged-ack", subj.receipts_subject(LAPTOP), "$JS.API.STREAM.PURGE.LLOOM_RECEIPTS",
                     "$KV.LLOOM_RESULTS.forged", subj.jobs_subject(MODEL), subj.complete_subject(MODEL)]  # fmt: skip
        watch = [await admin.subscribe(s) for s in forbidden]
        control = await admin.subscribe(subj.CATALOG_ANNOUNCE)
        await admin.flush()
        async with await nats.connect(local_url) as outsider:
            # Wait until the outsider's messages reach the hub at all (the control subject).
            async def control_arrives() -> bool:
                await outsider.publish(subj.CATALOG_ANNOUNCE, b"not signed")
                await outsider.flush()
                try:
                    await control.next_msg(timeout=0.2)
                except nats.errors.TimeoutError:
                    return False
                return True

            await eventually(control_arrives, timeout=LINK_S, what="the outsider's allowed message at the hub")
            for s in forbidden:
                await outsider.publish(s, b"forged")
            await outsider.flush()
            assert await control_arrives()  # published after the forbidden ones, over the same link
        await admin.flush()
        assert [w.pending_msgs for w in watch] == [0] * len(forbidden)


async def test_a_laptop_joins_an_operator_mode_hub_over_tls_with_a_creds_file(
    start_executor: StartExecutor, tmp_path: Path, backend: OpenAIDouble
) -> None:
    """`[hub] credentials` (a JWT .creds file) and `tls_ca` with a `tls://` URL: the leaf link is up and
    serves a hub client."""

    (tmp_path / "jwt").mkdir()
    pki, chain = Pki(tmp_path / "pki"), JwtChain(tmp_path / "jwt")
    leaf_port = free_port()
    conf = (chain.config.read_text()  # operator mode: the operator's and the account's JWTs
            + f"\nleafnodes {{ port: {leaf_port}, tls {{ cert_file: {json.dumps(pki.server_cert)},"
            f" key_file: {json.dumps(pki.server_key)} }} }}\n")  # fmt: skip
    async with EmbeddedNats(conf_extra=conf) as hub:
        laptop_creds = chain.creds(LAPTOP, subscribe=["lloom.>", f"_INBOX_{LAPTOP}.>"])
        config = laptop_config(tmp_path, backend, credentials=laptop_creds, tls_ca=pki.ca)
        laptop = await start_executor("--config", str(config), "--hub", f"tls://127.0.0.1:{leaf_port}")
        await laptop.started()
        await laptop.wait_for("joined hub", timeout=LINK_S)
        client_creds = chain.creds("carol", subscribe=["_INBOX_carol.>", "lloom.v1.catalog.announce"])
        options = NatsConnectOptions(creds_file=client_creds, inbox_prefix="_INBOX_carol")
        tally = Tally()
        async with await LloomClient.connect(hub.url, options=options, timeout=CALL_TIMEOUT_S) as client:
            await eventually(lambda: serves_laptop(client), timeout=LINK_S, what="the laptop in the hub's catalogue")
            await tally.run(client, 3)
    assert (tally.completed, tally.failed, tally.lost) == (3, {}, 0)


async def test_a_laptop_joins_with_an_nkey_seed_file(
    start_executor: StartExecutor, tmp_path: Path, backend: OpenAIDouble
) -> None:
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    (tmp_path / "laptop.nk").write_bytes(seed + b"\n")
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    client_seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    (tmp_path / "client.nk").write_bytes(client_seed + b"\n")
    client_public = nkeys.from_seed(bytearray(client_seed)).public_key.decode()
    leaf_port = free_port()
    conf = (f'authorization {{ users: [ {{ nkey: "{public}" }}, {{ nkey: "{client_public}" }} ] }}\n'
            f"leafnodes {{ port: {leaf_port} }}\n")  # fmt: skip
    async with EmbeddedNats(conf_extra=conf) as hub:
        config = laptop_config(tmp_path, backend, nkey_file=str(tmp_path / "laptop.nk"))
        laptop = await start_executor("--config", str(config), "--hub", f"nats-leaf://127.0.0.1:{leaf_port}")
        await laptop.started()
        await laptop.wait_for("joined hub", timeout=LINK_S)
        tally = Tally()
        options = NatsConnectOptions(nkey_file=str(tmp_path / "client.nk"))
        async with await LloomClient.connect(hub.url, options=options, timeout=CALL_TIMEOUT_S) as client:
            await eventually(lambda: serves_laptop(client), timeout=LINK_S, what="the laptop in the hub's catalogue")
            await tally.run(client, 2)
    assert (tally.completed, tally.failed, tally.lost) == (2, {}, 0)


@pytest.mark.parametrize("user", ["executor-1", "alice"])
async def test_an_executor_or_client_user_logging_in_as_a_leaf_reads_no_jobs_of_the_model_subjects(
    secure_hub: tuple[Hub, str], tmp_path: Path, user: str
) -> None:
    """The leafnodes port takes any user of the account. Over a leaf link a subscribe permission tied
    to a queue group does not carry: an executor user (allowed only `lloom.v1.complete.*` in
    `lloom-executors`) must not turn into a reader of every job there, nor a client user. Control:
    a subject the user may read (its own inbox) crosses the same link."""
    from executor.config import HubConfig
    from executor.process.leaf import server_conf

    hub, _ = secure_hub
    password = hub.env[{"executor-1": "LLOOM_NATS_EXECUTOR_1_PASSWORD", "alice": "alice"}[user]]  # type: ignore[index]
    leaf = EmbeddedNats(conf_extra=server_conf(HubConfig(url=hub.leaf_url, user=user, password=password)))
    await leaf.start()
    try:
        async with await nats.connect(leaf.url) as spy, \
                await nats.connect(hub.url, user="admin", password=hub.env["admin"]) as admin:  # type: ignore[index]  # fmt: skip
            readers = [await spy.subscribe(s) for s in ("lloom.v1.complete.>", "lloom.v1.complete.*",
                                                       subj.complete_subject(MODEL))]  # fmt: skip
            own = f"_INBOX_{user}.control"
            control = await spy.subscribe(own)
            await spy.flush()

            async def control_arrives() -> bool:
                await admin.publish(own, b"control")
                await admin.flush()
                try:
                    await control.next_msg(timeout=0.2)
                except nats.errors.TimeoutError:
                    return False
                return True

            await eventually(control_arrives, timeout=LINK_S, what=f"the {user} leaf's link carrying its own inbox")
            for model in (MODEL, "other-model"):
                await admin.publish(subj.complete_subject(model), b"a job")
            assert await control_arrives()  # sent after the jobs, over the same link
            await spy.flush()
            assert [r.pending_msgs for r in readers] == [0, 0, 0]
    finally:
        await leaf.stop()
