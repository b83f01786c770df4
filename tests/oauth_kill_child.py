"""Child process of the SIGKILL test: one token refresh, killed before the save.

argv[1] is the config as JSON. The test sets PRX_EMAIL_TEST_KILL_BEFORE_TOKEN_SAVE=1,
so oauth.py SIGKILLs this process after the token endpoint answered and before the
rotated refresh token reached the disk.
"""

from __future__ import annotations

import asyncio
import json
import sys

from prx_channel_email._oauth.tokens import TokenManager
from prx_channel_email.config import EmailConfig


async def main() -> None:
    config = EmailConfig(**json.loads(sys.argv[1]))
    await TokenManager(config).token()


if __name__ == "__main__":
    asyncio.run(main())
