"""Several accounts in one config: ``[channels_config.email.accounts.NAME]`` tables.

Each account table inherits every key it does not set from the top-level table
(the shared defaults). The environment overrides the file, the more specific
variable first::

    PRX_EMAIL_<NAME>__<FIELD>   one account (NAME upper-cased, "-" as "_")
    PRX_EMAIL_<FIELD>           every account
    [...accounts.NAME]          the account's table
    [channels_config.email]     the shared defaults

Without an ``accounts`` table the top-level table is the one account, named
"default", exactly as before. Service-wide settings (one store, one endpoint,
one replica identity) live in the top-level table only: an account that sets one
differently is an error. Every problem of every account is collected into one
:class:`ConfigError`, each line naming the account and the field, never a value.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from prx_channel_email.config import (
    _ACCOUNT_ENV,
    _TABLE_PATH,
    ENV_PREFIX,
    EmailConfig,
    _config_error,
    _snake_keys,
    read_table,
)
from prx_channel_email.errors import ConfigError

ACCOUNTS_KEY = "accounts"
# The name of the one account of a config without an ``accounts`` table.
DEFAULT_ACCOUNT = "default"
# One value for the whole process: an account may not set them differently.
SERVICE_FIELDS = (
    "state_dir",
    "state_url",
    "metrics_port",
    "metrics_host",
    "replica_id",
    "lease_secs",
    "max_concurrent_logins",
)
# Letters and digits, single "-" or "_" between them: the name is part of variable
# names, metric labels and host chat ids, so nothing there needs quoting.
_NAME_RE = re.compile(r"^[A-Za-z0-9]+(?:[-_][A-Za-z0-9]+)*$")
MAX_NAME_CHARS = 64


def account_env_prefix(name: str) -> str:
    """``PRX_EMAIL_<NAME>__``: the prefix of the variables of account ``name``."""
    return f"{ENV_PREFIX}{name.upper().replace('-', '_')}__"


def _account_env(name: str) -> dict[str, str]:
    """The account's own variables, field name -> text (unknown names included, so a
    misspelt variable is an error rather than silently ignored)."""
    prefix = account_env_prefix(name)
    return {
        key[len(prefix) :].lower(): value
        for key, value in os.environ.items()
        if key.upper().startswith(prefix) and len(key) > len(prefix)
    }


def load_accounts(path: str | os.PathLike[str] | None = None) -> dict[str, EmailConfig]:
    """Read every account of ``path`` (``$PRX_CONFIG``, ``./config.toml``): name -> settings.

    Without an ``accounts`` table: ``{"default": load_config(path)}``.
    """
    table, shown = read_table(path)
    return accounts_from_table(table, path=shown)


def accounts_from_table(
    table: Mapping[str, Any], *, path: str | os.PathLike[str] | None = None
) -> dict[str, EmailConfig]:
    """The accounts of a ``[channels_config.email]`` table (a file's or a host's)."""
    shown = str(path) if path is not None else None
    if not isinstance(table, Mapping) or ACCOUNTS_KEY not in table:
        return {DEFAULT_ACCOUNT: EmailConfig.from_table(table, path=shown)}
    shared = dict(table)
    accounts = shared.pop(ACCOUNTS_KEY)
    problems: list[str] = []
    if not isinstance(accounts, Mapping) or not accounts:
        raise _config_error(shown, [f"{ACCOUNTS_KEY}: expected a table of named account tables"])
    defaults = _snake_keys(shared, shown)
    unknown = [k for k in defaults if k not in EmailConfig.model_fields]
    problems += [f"{k}: unknown field (check the spelling)" for k in unknown]
    defaults = {k: v for k, v in defaults.items() if k not in unknown}
    bad_names = _name_problems(list(accounts))
    problems += [problem for _name, problem in bad_names]

    resolved: dict[str, EmailConfig] = {}
    for name, own in accounts.items():
        where = f"{ACCOUNTS_KEY}.{name}"
        if name in dict(bad_names):
            continue
        if not isinstance(own, Mapping):
            problems.append(f"{where}: expected a table of settings")
            continue
        try:
            mine = _snake_keys(own, shown)
        except ConfigError as exc:
            problems += [f"{where}.{p}" for p in exc.problems]
            continue
        env = _account_env(str(name))
        try:
            config = _validate(name, {**defaults, **mine}, env, shown)
        except ConfigError as exc:
            problems += _attribute(exc.problems, str(name), set(mine) | set(env), set(defaults))
            # Still say which service-wide values it changes (as written in the file).
            problems += [
                _service_problem(str(name), f)
                for f in SERVICE_FIELDS
                if f in mine and mine[f] != defaults.get(f, _default(f))
            ]
            continue
        problems += _service_problems(str(name), config, defaults, mine, env, shown)
        resolved[str(name)] = config
    if problems:
        # An inherited bad value is reported once, under its own name, not per account.
        raise _config_error(shown, list(dict.fromkeys(problems)))
    return resolved


def _validate(
    name: str, data: dict[str, Any], env: dict[str, str], shown: str | None
) -> EmailConfig:
    token = _ACCOUNT_ENV.set(env)
    path_token = _TABLE_PATH.set(shown)
    try:
        return EmailConfig(**data)
    finally:
        _TABLE_PATH.reset(path_token)
        _ACCOUNT_ENV.reset(token)


def _attribute(problems: list[str], name: str, own: set[str], shared: set[str]) -> list[str]:
    """Name each problem's account: a field the account sets (in its table or its
    variables), or one nobody set (a missing required field), is the account's; a
    field only the shared table sets is reported as the shared table's."""
    out = []
    for problem in problems:
        field = problem.split(":", 1)[0].split(".", 1)[0]
        if field in shared and field not in own:
            out.append(problem)
            continue
        # The password hint names the general variable; this account has its own.
        text = problem.replace(f"{ENV_PREFIX}PASSWORD", f"{account_env_prefix(name)}PASSWORD")
        out.append(f"{ACCOUNTS_KEY}.{name}.{text}")
    return out


def _service_problems(
    name: str,
    config: EmailConfig,
    defaults: dict[str, Any],
    mine: dict[str, Any],
    env: dict[str, str],
    shown: str | None,
) -> list[str]:
    """An account may repeat a service-wide value, never change it."""
    touched = [f for f in SERVICE_FIELDS if f in mine or f in env]
    if not touched:
        return []
    plain = {k: v for k, v in {**defaults, **mine}.items() if k not in SERVICE_FIELDS}
    base = _validate(name, plain, {k: v for k, v in env.items() if k not in SERVICE_FIELDS}, shown)
    return [
        _service_problem(name, field)
        for field in touched
        if getattr(config, field) != getattr(base, field)
    ]


def _default(field: str) -> Any:
    return EmailConfig.model_fields[field].get_default(call_default_factory=True)


def _service_problem(name: str, field: str) -> str:
    return (
        f"{ACCOUNTS_KEY}.{name}.{field}: a service-wide setting (one for all accounts);"
        " set it in the top-level table only"
    )


def _name_problems(names: list[Any]) -> list[tuple[Any, str]]:
    """(name, problem) for each name that cannot be an account's."""
    problems = []
    seen: dict[str, str] = {}
    for name in names:
        if not isinstance(name, str) or not _NAME_RE.match(name) or len(name) > MAX_NAME_CHARS:
            problems.append(
                (
                    name,
                    f"{ACCOUNTS_KEY}.{name}: an account name is letters and digits, with single"
                    f" '-' or '_' between them (at most {MAX_NAME_CHARS} characters)",
                )
            )
            continue
        prefix = account_env_prefix(name)
        if prefix in seen:
            problems.append(
                (
                    name,
                    f"{ACCOUNTS_KEY}.{name}: the same variables ({prefix}*) as account"
                    f" {seen[prefix]!r}; rename one",
                )
            )
        seen[prefix] = name
    return problems
