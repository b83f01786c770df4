"""The doctor's OAuth checks: the token store, a real refresh, the scopes.

They run before the IMAP and SMTP chains and hand those chains the token manager
holding the token just obtained, so the logins that follow use the channel's own
XOAUTH2 code with no further token request.
"""

from __future__ import annotations

import asyncio

from prx_channel_email._oauth.tokens import TokenManager, required, token_manager, token_store
from prx_channel_email.config import EmailConfig
from prx_channel_email.config.providers import LOGIN_FIX, missing_scopes, provider_named
from prx_channel_email.doctor.report import Check
from prx_channel_email.errors import (
    AuthenticationError,
    ChannelError,
    OAuthReauthRequired,
    OAuthUnavailable,
)


def reauth_fix(provider: str) -> str:
    """What to do when the grant is gone, with the provider's usual cause."""
    hint = provider_named(provider).oauth_reauth_hint
    return f"{LOGIN_FIX}. {hint}" if hint else LOGIN_FIX


async def oauth_checks(config: EmailConfig, budget: float) -> tuple[TokenManager, list[Check]]:
    """Store, refresh and scope checks; returns the token manager the later chains log
    in with (holding the token just obtained)."""
    config, tokens = token_manager(config)
    manager = required(tokens, "the doctor's OAuth checks")
    provider = manager.provider
    store = token_store(config)
    checks: list[Check] = []
    record = await store.load()
    if record is None and config.oauth_refresh_token is None:
        nothing = f"no token stored at {store.location}"
        checks.append(Check("oauth store", "fail", nothing, LOGIN_FIX))
        checks.append(Check("oauth refresh", "skip", "skipped: nothing to refresh", None))
        checks.append(Check("oauth scopes", "skip", "skipped: nothing to refresh", None))
        return manager, checks
    if record is None:
        checks.append(
            Check("oauth store", "pass", "seeded from oauth_refresh_token (saved at first use)")
        )
    elif not await store.private():
        where = config.state_dir
        checks.append(
            Check(
                "oauth store",
                "fail",
                f"{store.location} or its directory can be read by others",
                f"chmod 700 {where}; chmod 600 {where}/*",
            )
        )
    else:
        checks.append(Check("oauth store", "pass", f"{store.location} (owner-only)"))
    try:
        async with asyncio.timeout(2 * budget):
            token = await manager.refresh_now()
    except TimeoutError:
        checks.append(
            Check(
                "oauth refresh",
                "fail",
                f"the token endpoint did not answer within {2 * budget:g} s",
                f"check the network path to {provider.token_url}",
            )
        )
        checks.append(Check("oauth scopes", "skip", "skipped: no token", None))
        return manager, checks
    except OAuthReauthRequired as exc:
        checks.append(Check("oauth refresh", "fail", exc.message, reauth_fix(provider.name)))
        checks.append(Check("oauth scopes", "skip", "skipped: no token", None))
        return manager, checks
    except OAuthUnavailable as exc:
        checks.append(
            Check(
                "oauth refresh",
                "fail",
                exc.message,
                f"the token endpoint {provider.token_url} is down or unreachable; try again later",
            )
        )
        checks.append(Check("oauth scopes", "skip", "skipped: no token", None))
        return manager, checks
    except (AuthenticationError, ChannelError) as exc:
        fix = (
            "check oauth_client_id and oauth_client_secret (a Google 'Desktop app' client "
            "needs its client secret too)"
            if exc.code == "oauth_client_invalid"
            else reauth_fix(provider.name)
        )
        checks.append(Check("oauth refresh", "fail", f"{exc.message} [{exc.code}]", fix))
        checks.append(Check("oauth scopes", "skip", "skipped: no token", None))
        return manager, checks
    left = f"valid for {token.expires_at - manager.now():.0f} s" if token.expires_at else "issued"
    checks.append(
        Check("oauth refresh", "pass", f"the token endpoint answered: access token {left}")
    )
    granted = manager.granted_scope()
    missing = missing_scopes(provider, granted)
    if missing:
        checks.append(
            Check(
                "oauth scopes",
                "fail",
                f"the grant lacks {' '.join(missing)} (granted: {granted})",
                "sign in again after adding the scopes: " + reauth_fix(provider.name),
            )
        )
    else:
        checks.append(
            Check("oauth scopes", "pass", f"cover IMAP and SMTP ({granted or 'as requested'})")
        )
    return manager, checks
