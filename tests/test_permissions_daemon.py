"""Permissions (docs/permissions.md) on real daemons: token users through
the tcp light client and over a link, a second ipc uid, and the daemon
refusing a bad [[users]] config at start."""

import grp
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from daemons import tcp_of, wait_for

import tensorbus
from tensorbus import AuthError, PermissionDenied, ReceiveTimeout

pytestmark = pytest.mark.timeout(120)

CLUSTER = "cluster-token-0123"
DASHBOARD = "dashboard-token-4567"


def secret(tmp_path, name, text, mode=0o600):
    path = tmp_path / name
    path.write_text(text + "\n")
    os.chmod(path, mode)
    return str(path)


def config(tmp_path, body: str) -> str:
    path = tmp_path / "tensorbus.toml"
    path.write_text(textwrap.dedent(body))
    return str(path)


def dashboard_config(tmp_path) -> str:
    token = secret(tmp_path, "dashboard.token", DASHBOARD)
    return config(
        tmp_path,
        f"""
        [[users]]
        name = "dashboard"
        token_file = "{token}"
        publish = {{ allow = ["metrics/>"] }}
        subscribe = {{ allow = [">"], deny = ["grad/>"] }}
        """,
    )


def test_a_token_user_through_the_light_client(daemon_factory, tmp_path):
    d = daemon_factory(
        "--tcp",
        "127.0.0.1:*",
        "--token-file",
        secret(tmp_path, "cluster.token", CLUSTER),
        "--config",
        dashboard_config(tmp_path),
        "--heartbeat",
        "0.2",
    )
    with (
        tensorbus.connect(d.url) as owner,
        tensorbus.connect(tcp_of(d), token=DASHBOARD) as dash,
    ):
        with pytest.raises(PermissionDenied) as exc:
            dash.publisher("grad/w")
        assert "user 'dashboard'" in str(exc.value) and "create 'grad/w'" in str(exc.value)

        local = owner.subscribe("metrics/>")
        pub = dash.publisher("metrics/loss")  # allowed: served
        pub.send(b"0.25")
        assert bytes(local.recv(timeout=5).data) == b"0.25"

        denied = dash.subscribe("grad/>")
        with pytest.raises(PermissionDenied, match="may not subscribe to 'grad/>'"):
            denied.recv(timeout=5)

        every = dash.subscribe(">")  # allowed, but deny wins topic by topic
        wait_for(
            lambda: any(">" in link["interest"] for link in owner.stats()["broker"]["links"]),
            what="the light client's interest",
        )
        owner.publisher("grad/w").send(b"secret")
        owner.publisher("metrics/acc").send(b"0.9")
        got = every.recv(timeout=5)
        assert (got.topic, bytes(got.data)) == ("metrics/acc", b"0.9")
        with pytest.raises(ReceiveTimeout):
            every.recv(timeout=0.5)
    # The cluster token stays all-powerful, and a wrong token gets nothing.
    with tensorbus.connect(tcp_of(d), token=CLUSTER) as admin:
        admin.publisher("grad/w").close()
    with pytest.raises(AuthError):
        tensorbus.connect(tcp_of(d), token="nobody-knows", timeout=2)


def test_a_peer_whose_link_token_is_a_restricted_user(daemon_factory, tmp_path):
    """B dials A with the dashboard's token: A lets B's metrics in, keeps
    B's gradients out, and forwards B what the dashboard may read."""
    a = daemon_factory(
        "--tcp",
        "127.0.0.1:*",
        "--token-file",
        secret(tmp_path, "cluster.token", CLUSTER),
        "--config",
        dashboard_config(tmp_path),
        "--heartbeat",
        "0.2",
        "--transport",
        "tcp",
        path=tmp_path / "a",
    )
    b = daemon_factory(
        "--tcp",
        "127.0.0.1:*",
        "--peer",
        tcp_of(a),
        "--heartbeat",
        "0.2",
        "--transport",
        "tcp",
        path=tmp_path / "b",
        env={**os.environ, "TENSORBUS_TOKEN": DASHBOARD},
    )
    with tensorbus.connect(a.url) as ca, tensorbus.connect(b.url) as cb:

        def link_interest(client):
            links = [x for x in client.stats()["broker"]["links"] if x["kind"] == "peer"]
            return links[0]["interest"] if links and links[0]["state"] == "up" else None

        at_a = ca.subscribe(">")
        wait_for(lambda: link_interest(cb) == [">"], what="A's interest at B")
        cb.publisher("grad/w").send(b"kept out")
        cb.publisher("metrics/loss").send(b"let in")
        got = at_a.recv(timeout=5)
        assert (got.topic, bytes(got.data)) == ("metrics/loss", b"let in")
        with pytest.raises(ReceiveTimeout):
            at_a.recv(timeout=0.5)
        assert "grad/w" not in {t["name"] for t in ca.topics()}

        at_b = cb.subscribe("*/x")
        cb.subscribe("grad/>")  # refused at A: never in the link's interest there
        wait_for(lambda: link_interest(ca) == ["*/x"], what="B's allowed interest at A")
        ca.publisher("grad/x").send(b"secret")
        ca.publisher("metrics/x").send(b"public")
        got = at_b.recv(timeout=5)
        assert (got.topic, bytes(got.data)) == ("metrics/x", b"public")
        with pytest.raises(ReceiveTimeout):
            at_b.recv(timeout=0.5)

        # B's responders serve A's requesters only on topics B's user may read.
        cb.respond("metrics/rpc", lambda req: b"B:" + bytes(req.data))
        cb.respond("grad/rpc", lambda req: b"never")
        wait_for(lambda: ca.stats()["broker"]["remote_groups"], what="B serving at A")
        assert bytes(ca.request("metrics/rpc", b"1").data) == b"B:1"
        with pytest.raises(tensorbus.NoResponders):
            ca.request("grad/rpc", b"1", timeout=1)
    a.proc.terminate()
    log = a.proc.communicate(timeout=10)[1]
    assert "permission denied: user 'dashboard'" in log and "may not publish on 'grad/w'" in log
    assert "may not serve requests of 'grad/rpc'" in log


SETPRIV = shutil.which("setpriv")
NOBODY = 65534

IPC_CLIENT = """
import sys, tensorbus
from tensorbus import PermissionDenied
url = sys.argv[1]
with tensorbus.connect(url) as c:
    try:
        c.publisher("grad/w")
        print("grad/w published")
    except PermissionDenied as exc:
        print("refused:", exc)
    try:
        c.subscribe("grad/>")
        print("grad/> subscribed")
    except PermissionDenied as exc:
        print("refused:", exc)
    sub = c.subscribe("metrics/>")
    c.publisher("metrics/loss").send(b"0.5")
    print("got", bytes(sub.recv(timeout=5).data).decode())
    try:
        stream = c.requests("svc/echo")
        print("responder ready", flush=True)
        r = stream.next(timeout=10)
        r.reply(b"pong")
        print("replied")
    except PermissionDenied as exc:
        print("refused:", exc)
"""


@pytest.mark.skipif(
    os.getuid() != 0 or SETPRIV is None, reason="needs root and setpriv to run as a second uid"
)
@pytest.mark.parametrize("allow_responses", [True, False])
def test_a_second_ipc_uid_is_held_to_its_permissions(daemon_factory, allow_responses):
    """uid 65534 (in its own group, shared with --ipc-group) connects on ipc;
    its socket directory is a fresh /tmp directory it can reach."""
    group = grp.getgrgid(NOBODY).gr_name
    base = tempfile.mkdtemp(prefix="tb-perm-")
    os.chmod(base, 0o711)
    try:
        cfg = os.path.join(base, "tensorbus.toml")
        with open(cfg, "w") as f:
            f.write(
                textwrap.dedent(
                    f"""
                    [[users]]
                    name = "nobody"
                    uid = {NOBODY}
                    publish = {{ allow = ["metrics/>"] }}
                    subscribe = {{ allow = ["metrics/>", "svc/>"] }}
                    allow_responses = {str(allow_responses).lower()}
                    """
                )
            )
        d = daemon_factory("--config", cfg, "--ipc-group", group, path=Path(base))
        with tensorbus.connect(d.url) as owner:
            proc = subprocess.Popen(
                [SETPRIV, "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups"]
                + [sys.executable, "-u", "-c", IPC_CLIENT, d.url],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, "HOME": base},
            )
            try:
                lines = [proc.stdout.readline().strip() for _ in range(4)]
                assert lines[0].startswith("refused:") and "user 'nobody'" in lines[0], lines
                assert "publish on 'grad/w'" in lines[0]
                assert lines[1].startswith("refused:") and "subscribe to 'grad/>'" in lines[1]
                assert lines[2] == "got 0.5", (lines, proc.stderr.read() if lines[2] == "" else "")
                assert lines[3] == "responder ready"
                if allow_responses:
                    reply = owner.request("svc/echo", b"ping", timeout=5)
                    assert bytes(reply.data) == b"pong"
                else:
                    # The responder counts the reply as undeliverable; the
                    # daemon logs why.
                    with pytest.raises(tensorbus.TensorbusError):
                        owner.request("svc/echo", b"ping", timeout=1, retries=0)
            finally:
                proc.kill()
                proc.wait(5)
                proc.stdout.close()
                proc.stderr.close()
        d.proc.terminate()
        log = d.proc.communicate(timeout=10)[1]
        assert "user 'nobody'" in log and "may not publish on 'grad/w'" in log
        assert ("may not publish on '_inbox/" in log) is not allow_responses
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_uid_that_is_no_user_is_refused(daemon_factory, tmp_path):
    if os.getuid() != 0 or SETPRIV is None:
        pytest.skip("needs root and setpriv to run as a second uid")
    base = tempfile.mkdtemp(prefix="tb-perm-")
    os.chmod(base, 0o711)
    try:
        group = grp.getgrgid(NOBODY).gr_name
        d = daemon_factory("--ipc-group", group, path=Path(base))
        code = "import sys, tensorbus\ntry:\n tensorbus.connect(sys.argv[1], timeout=3)\n"
        code += "except tensorbus.AuthError as e:\n print('refused:', e)\n"
        out = subprocess.run(
            [SETPRIV, "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups"]
            + [sys.executable, "-c", code, d.url],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "is neither this broker's uid 0 nor a configured user's" in out.stdout, out
    finally:
        shutil.rmtree(base, ignore_errors=True)


def serve(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tensorbus", "serve", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("users", "words"),
    [
        ('name = "a"\ntoken = "x"\ncolour = "red"', ["entry 0 ('a')", "unknown key 'colour'"]),
        ('name = "a"\nuid = "1001"', ["entry 0 ('a')", "key 'uid'"]),
        ('name = "a"\ntoken = "x"\n[[users]]\nname = "b"\ntoken = "x"', ["0 ('a')", "1 ('b')"]),
        ('name = "a"\ntoken_file = "/nonexistent/a.token"', ["key 'token_file'", "/nonexistent"]),
    ],
)
def test_a_bad_users_config_stops_the_daemon(tmp_path, users, words):
    cfg = config(tmp_path, "[[users]]\n" + users + "\n")
    result = serve("--config", cfg, "--ipc", str(tmp_path / "run" / "b.sock"))
    assert result.returncode == 1, result
    assert cfg in result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


def test_a_token_file_open_to_others_stops_the_daemon(tmp_path):
    loose = secret(tmp_path, "cluster.token", CLUSTER, mode=0o644)
    result = serve("--token-file", loose, "--ipc", str(tmp_path / "run" / "b.sock"))
    assert result.returncode == 1
    assert f"--token-file: token file {loose} is accessible by group or others" in result.stderr
