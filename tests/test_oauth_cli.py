"""`prx-email auth login | status | logout` and the doctor's OAuth checks, headless.

The browser flow is driven by an HTTP client standing in for the browser: it
opens the printed URL, the authorization server redirects it to the CLI's
loopback listener. The device flow is approved on the authorization server.
"""

from __future__ import annotations

import asyncio
import json
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from prx_channel_email._oauth.tokens import token_store
from prx_channel_email._storage import TokenStore
from prx_channel_email.config import load_config
from tests.oauth_helpers import oauth_config
from tests.operator_helpers import read_until, reaped, subprocess_env
from tests.servers.dovecot import Account, DovecotServer
from tests.servers.oauth_server import OAuthServer
from tests.servers.smtp import SmtpServer


def write_config(path: Path, fields: dict[str, Any]) -> Path:
    lines = ["[channels_config.email]"]
    for key, value in fields.items():
        if value is None:
            continue
        lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def config_file(
    tmp_path: Path,
    oauth_server: OAuthServer,
    dovecot: DovecotServer,
    smtp: SmtpServer,
    account: Account,
    **overrides: Any,
) -> Path:
    config = oauth_config(tmp_path, oauth_server, dovecot, smtp, account, seed=False, **overrides)
    data = config.model_dump(mode="json")
    return write_config(tmp_path / "config.toml", data)


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "prx_channel_email.cli", *args],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=timeout,
        check=False,
    )


def start_login(path: Path, flag: str) -> subprocess.Popen[str]:
    """``prx-email auth login FLAG`` in a child process, its output readable as it comes."""
    return subprocess.Popen(
        [sys.executable, "-m", "prx_channel_email.cli", "auth", "login", flag, "-c", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )


def secrets_of(store: TokenStore) -> list[str]:
    record = asyncio.run(store.load())
    assert record is not None
    return [s for s in (record.refresh_token, record.access_token) if s]


def test_browser_login_status_doctor_and_logout(
    tmp_path: Path, oauth_server: OAuthServer, dovecot_oauth: DovecotServer, smtp_oauth: SmtpServer
) -> None:
    account = dovecot_oauth.add_user()
    oauth_server.user = account.username
    path = config_file(tmp_path, oauth_server, dovecot_oauth, smtp_oauth, account)
    proc = start_login(path, "--no-browser")
    with reaped(proc):
        assert proc.stdout is not None
        shown = read_until(proc.stdout, "Waiting for the sign-in", within=30)
        url = next(w for w in shown.split() if w.startswith(oauth_server.url + "/authorize"))
        assert "code_challenge_method=S256" in url
        # The "browser": follow the authorization server's redirect to the loopback.
        page = httpx.get(url, follow_redirects=True, timeout=10, trust_env=False)
        assert page.status_code == 200 and "Signed in" in page.text
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
    store = token_store(load_config(path))
    assert stat.S_IMODE((tmp_path / "state" / "state.sqlite3").stat().st_mode) == 0o600
    tokens = secrets_of(store)

    status = cli("auth", "status", "-c", str(path))
    assert status.returncode == 0, status.stderr
    assert "scopes: mail" in status.stdout and "owner-only: yes" in status.stdout

    doctor = cli("doctor", "--json", "-c", str(path))
    report = json.loads(doctor.stdout)
    by_name = {c["name"]: c for c in report["checks"]}
    for name in ("oauth store", "oauth refresh", "oauth scopes", "imap login", "smtp auth"):
        assert by_name[name]["status"] == "pass", by_name[name]
    tokens += secrets_of(store)  # the doctor's real refresh rotated them

    logout = cli("auth", "logout", "-c", str(path))
    assert logout.returncode == 0, logout.stderr
    assert "revoked" in logout.stdout and asyncio.run(store.load()) is None
    assert not oauth_server.active(tokens[-1])["active"]

    for result in (status, doctor, logout):
        for token in tokens:
            assert token not in result.stdout + result.stderr
    for token in tokens:
        assert token not in out + err


def test_device_login_headless(
    tmp_path: Path, oauth_server: OAuthServer, dovecot_oauth: DovecotServer, smtp_oauth: SmtpServer
) -> None:
    account = dovecot_oauth.add_user()
    path = config_file(tmp_path, oauth_server, dovecot_oauth, smtp_oauth, account)
    proc = start_login(path, "--device")
    with reaped(proc):
        assert proc.stdout is not None
        shown = read_until(proc.stdout, "enter the code", within=30)
        code = oauth_server.wait_device_request()
        assert code in shown + read_until(proc.stdout, "waiting", within=10)
        oauth_server.approve(code, account.username)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
    assert "signed in as" in out
    tokens = secrets_of(token_store(load_config(path)))
    assert not any(t in out + err for t in tokens)
    doctor = cli("doctor", "--json", "-c", str(path))
    assert json.loads(doctor.stdout)["exit_code"] == 0, doctor.stdout


def test_google_device_flow_is_refused_with_the_reason(
    tmp_path: Path, oauth_server: OAuthServer, dovecot_oauth: DovecotServer, smtp_oauth: SmtpServer
) -> None:
    account = dovecot_oauth.add_user()
    path = config_file(
        tmp_path, oauth_server, dovecot_oauth, smtp_oauth, account,
        oauth_provider="google", oauth_scopes=[], oauth_token_url=None,
        oauth_authorize_url=None, oauth_device_url=None, oauth_revoke_url=None,
    )  # fmt: skip
    result = cli("auth", "login", "--device", "-c", str(path))
    assert result.returncode == 1
    text = " ".join(result.stderr.split())
    assert "device flow does not allow the mail scope" in text
    assert "--no-browser" in text
    assert oauth_server.total_token_requests() == 0


def test_doctor_on_a_revoked_grant_says_to_sign_in_again(
    tmp_path: Path, oauth_server: OAuthServer, dovecot_oauth: DovecotServer, smtp_oauth: SmtpServer
) -> None:
    account = dovecot_oauth.add_user()
    path = config_file(tmp_path, oauth_server, dovecot_oauth, smtp_oauth, account)
    grant = oauth_server.issue(account.username)
    oauth_server.revoke_all(account.username)
    env_path = write_config(
        tmp_path / "seeded.toml",
        {**_table(path), "oauth_refresh_token": grant},
    )
    doctor = cli("doctor", "--json", "-c", str(env_path))
    report = json.loads(doctor.stdout)
    assert report["exit_code"] == 1
    check = {c["name"]: c for c in report["checks"]}["oauth refresh"]
    assert check["status"] == "fail"
    assert "prx-email auth login" in check["fix"]
    assert grant not in doctor.stdout + doctor.stderr


def test_doctor_without_a_stored_grant(
    tmp_path: Path, oauth_server: OAuthServer, dovecot_oauth: DovecotServer, smtp_oauth: SmtpServer
) -> None:
    account = dovecot_oauth.add_user()
    path = config_file(tmp_path, oauth_server, dovecot_oauth, smtp_oauth, account)
    report = json.loads(cli("doctor", "--json", "-c", str(path)).stdout)
    check = {c["name"]: c for c in report["checks"]}["oauth store"]
    assert check["status"] == "fail" and "prx-email auth login" in check["fix"]


def _table(path: Path) -> dict[str, Any]:
    import tomllib

    return dict(tomllib.loads(path.read_text())["channels_config"]["email"])
