"""Joining a hub: the `[hub]` table and `--hub` are checked at load, and the leaf link's log lines become
the executor's own events, once per change (the process tests are in tests/test_leaf_hub.py)."""

from __future__ import annotations

import asyncio
import socket
import stat
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from executor.config import ConfigError, HubConfig, parse_config
from executor.process.embedded_nats import EmbeddedNats
from executor.process.leaf import LINK_DENY, HubLink, leaf_domain, server_conf
from executor.runtime.cli import main
from executor.secrets import config_secrets

# Lines as nats-server 2.15 writes them (seen in tests/test_leaf_hub.py's runs).
CREATED = "[1] 2026/11/29 21:09:13.312819 [INF] 127.0.0.1:17423 - lid:7 - Leafnode connection created for account: $G "
REFUSED = "[1] 2026/11/29 21:09:13.314109 [ERR] 127.0.0.1:17423 - lid:7 - Leafnode Error 'Authorization Violation'"
LIMIT = "[1] 2026/11/29 21:19:47.403255 [ERR] 127.0.0.1:42173 - lid:5 - Leafnode Error 'maximum account active connections exceeded'"
TLS = ("[1] 2026/11/29 21:23:31.604214 [ERR] 127.0.0.1:17440 - lid:7 - TLS leafnode handshake error: tls: failed to"
       " verify certificate: x509: certificate signed by unknown authority")
CLOSED = "[1] 2026/11/29 21:09:13.314136 [INF] 127.0.0.1:17423 - lid:7 - Leafnode connection closed: Client Closed - Remote: N"
UNREACHABLE = ('[1] 2026/11/29 21:09:15.315857 [ERR] Error trying to connect as leafnode to remote server "127.0.0.1:17423"'
               " (attempt 1): dial tcp 127.0.0.1:17423: connect: connection refused")  # fmt: skip


def parse(text: str, **environ: str):  # type: ignore[no-untyped-def]
    return parse_config(text, source="executor.toml", environ=environ)


def test_a_hub_with_a_password_from_the_environment_is_expanded_and_masked() -> None:
    config = parse('[hub]\nurl = "nats-leaf://hub:7422"\nuser = "laptop-1"\npassword = "${HUB_PW}"\n', HUB_PW="s3cret-pw")
    assert config.hub.password == "s3cret-pw"
    assert "s3cret-pw" in set(config_secrets(config))
    assert "s3cret-pw" in server_conf(config.hub)  # the server reads it from its private config file only


@pytest.mark.parametrize(("toml", "message"), [
    ('[hub]\nurl = "http://hub:7422"\n', "use one of nats-leaf://"),
    ('[hub]\nurl = "nats-leaf://hub:7422"\nuser = "a"\ncredentials = "a.creds"\n', "one way to authenticate"),
    ('[hub]\nurl = "nats-leaf://hub:7422"\npassword = "x"\n', "needs a user"),
    ('[hub]\nurl = "nats-leaf://hub:7422"\n[node]\nnats_url = "nats://other:4222"\n', "keep one"),
    ('[hub]\nurl = "nats-leaf://hub:7422"\ndomain = "a.b"\n', "domain"),
    # What would break out of the quoted url in the embedded server's config file, or crash the parser.
    ('[hub]\nurl = "nats-leaf://hub:7422\\"]}\\nhttp: 8222"\n', "percent-encoded"),
    ('[hub]\nurl = "nats-leaf://hub:7422 {"\n', "percent-encoded"),
    ('[hub]\nurl = "nats-leaf://[hub:7422"\n', "hub url"),
    ('[hub]\nurl = "nats-leaf://hub:port"\n', "hub url"),
    ('[hub]\nurl = "nats-leaf://:7422"\n', "host"),
])  # fmt: skip
def test_a_hub_config_that_cannot_work_is_refused_naming_the_key(toml: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse(toml)


def test_hub_and_nats_on_the_command_line_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--hub", "nats-leaf://127.0.0.1:7422", "--nats", "nats://127.0.0.1:4222", "run"]) == 2
    assert "keep one" in capsys.readouterr().err
    assert main(["--hub", "http://hub:7422", "run"]) == 2
    assert "nats-leaf://" in capsys.readouterr().err


def test_the_leaf_remote_keeps_jetstream_receipts_and_the_queue_off_the_link() -> None:
    conf = server_conf(HubConfig(url="tls://hub:7422", user="laptop 1", password="p@ss", tls_ca="/ca.pem"))
    assert '"url": "tls://laptop%201:p%40ss@hub:7422"' in conf  # user and password are escaped into the URL
    for subject in ("$JS.>", "$KV.>", "lloom.v1.receipts.>", "lloom.v1.jobs.>", "lloom.v1.results.>"):
        assert subject in LINK_DENY
    assert '"deny_imports"' in conf and '"deny_exports"' in conf and '"ca_file": "/ca.pem"' in conf
    assert leaf_domain(HubConfig(url="nats-leaf://h:1"), "my laptop.local") == "lloom-leaf-my-laptop-local"
    assert leaf_domain(HubConfig(url="nats-leaf://h:1", domain="mine"), "x") == "mine"


async def test_the_link_is_reported_joined_refused_lost_and_unreachable_once_per_change() -> None:
    link = HubLink(HubConfig(url="nats-leaf://laptop-1:secret@hub:7422"), "lloom-leaf-x", confirm_s=0.01)
    with capture_logs() as logs:
        link.on_line(UNREACHABLE)
        link.on_line(UNREACHABLE)  # the server retries every second: said once
        link.on_line(CREATED)
        await asyncio.wait_for(link.joined.wait(), 5)
        link.on_line(CLOSED)
        link.on_line(UNREACHABLE)  # still the same outage
        link.on_line(CREATED)
        await asyncio.wait_for(link.joined.wait(), 5)
        # A refusal follows the creation within a round trip: never reported as joined.
        link.on_line(CLOSED)
        link.on_line(CREATED)
        link.on_line(REFUSED)
        link.on_line(CLOSED)
        link.on_line(CREATED)
        assert link.confirming
        link.on_line(REFUSED)
        assert not link.confirming  # the pending "joined hub" is withdrawn
        link.on_line(CLOSED)
        link.on_line(CREATED)
        link.on_line(LIMIT)
        link.on_line(CLOSED)
        link.on_line(CREATED)
        link.on_line(TLS)
        link.on_line(CLOSED)
        link.on_line(UNREACHABLE)
    events = [e["event"] for e in logs]
    assert events == [
        "cannot reach the hub yet; the embedded server keeps trying",
        "joined hub",
        "lost the hub link; the embedded server reconnects by itself, local clients are still served",
        "joined hub",
        "lost the hub link; the embedded server reconnects by itself, local clients are still served",
        "the hub refused this leaf's credentials",
        "the hub closed the leaf link with an error; the embedded server retries",
        "TLS to the hub failed; the embedded server retries",
    ]
    assert (link.joins, link.state, link.joined.is_set()) == (2, "tls", False)
    assert all("secret" not in str(e) for e in logs) and logs[1]["hub"] == "nats-leaf://laptop-1:***@hub:7422"
    link.stop()


def test_an_nkey_seed_file_goes_into_the_private_server_config_and_a_missing_one_is_a_config_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    seed = tmp_path / "laptop.nk"
    seed.write_text("SUAEXAMPLESEED\n")
    assert '"nkey": "SUAEXAMPLESEED"' in server_conf(HubConfig(url="nats-leaf://hub:7422", nkey_file=str(seed)))
    with pytest.raises(ConfigError, match="nkey_file"):
        server_conf(HubConfig(url="nats-leaf://hub:7422", nkey_file=str(tmp_path / "missing.nk")))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("field", ["user", "password", "credentials"])
async def test_values_with_quotes_newlines_and_braces_cannot_add_config_to_the_leaf_server(
    tmp_path: Path, field: str
) -> None:
    """Each value lands in the embedded server's config file as one quoted string (or percent-encoded in
    the URL): a value written to add a monitoring port adds nothing, and the server starts with it."""
    port = _free_port()
    evil = f'x"}}]\n}}\nhttp: {port}\nleafnodes {{ remotes: [ {{url: "nats-leaf://127.0.0.1:1"}} ] }}\n{{é$HOME'
    values = {"user": {"user": evil}, "password": {"user": "laptop-1", "password": evil},
              "credentials": {"credentials": str(tmp_path / evil.replace("/", "_"))}}[field]  # fmt: skip
    hub = HubConfig(url="nats-leaf://127.0.0.1:1", **values)  # nobody there: the link keeps trying
    store = tmp_path / "störe dir"  # and a store directory a user's home might have
    server = EmbeddedNats(jetstream=True, store_dir=str(store), conf_extra=server_conf(hub), jetstream_domain="lloom-leaf-x")
    try:
        await server.start()
        assert server._tmp is not None
        conf = Path(server._tmp.name) / "server.conf"
        assert stat.S_IMODE(conf.stat().st_mode) == 0o600  # it may hold the hub password or nkey seed
        with pytest.raises(OSError):  # the injected monitoring port is not there
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
    finally:
        await server.stop()
