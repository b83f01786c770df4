"""The exception hierarchy.

Every error the package raises is a :class:`ChannelError`, so a host framework
can catch one type. Each carries a short machine-readable ``code`` (also used
in log records) and a message a person can act on. No message ever contains a
secret.
"""

from __future__ import annotations


class ChannelError(Exception):
    """Base of every error raised by prx_channel_email."""

    code: str = "channel_error"
    # The account the error is about (several accounts in one channel); None when it
    # is about none in particular (or the channel has one account and no one asked).
    account: str | None = None

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigError(ChannelError, ValueError):
    """The configuration is missing, unreadable or invalid.

    ``problems`` lists one human-readable line per bad field; ``path`` names the
    file that was read (None when the config came from code). It is also a
    ValueError, so an EmailConfig nested in a host's own pydantic model still
    reports as that model's validation error.
    """

    code = "config_invalid"

    def __init__(
        self, message: str, *, path: str | None = None, problems: list[str] | None = None
    ) -> None:
        super().__init__(message)
        self.path = path
        self.problems = problems or []


class TransportError(ChannelError):
    """A network-level failure talking to a mail server (retryable)."""

    code = "transport_error"

    def __init__(self, message: str, *, host: str = "", port: int = 0, code: str | None = None):
        super().__init__(message, code=code)
        self.host = host
        self.port = port


class AuthenticationError(ChannelError):
    """The server refused the credentials. Retrying quickly will not help."""

    code = "auth_failed"

    def __init__(self, message: str, *, server: str = "", code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.server = server


class NotReadyError(ChannelError, TimeoutError):
    """``wait_ready`` timed out with no permanent failure (still connecting or
    reconnecting). Also a TimeoutError; ``status`` is the channel's state then."""

    code = "timeout"

    def __init__(self, message: str, *, status: object = None) -> None:
        super().__init__(message)
        self.status = status


class InsecureConnectionError(ChannelError):
    """A plaintext connection to a non-loopback host was refused."""

    code = "insecure_refused"


class FolderNotFoundError(ChannelError):
    """The configured IMAP folder does not exist; ``folders`` lists those that do."""

    code = "folder_missing"

    def __init__(self, folder: str, folders: list[str]) -> None:
        shown = ", ".join(folders) if folders else "(none)"
        super().__init__(f"IMAP folder {folder!r} does not exist. Folders on the server: {shown}")
        self.folder = folder
        self.folders = folders


class SendError(ChannelError):
    """A reply could not be sent and will not be retried.

    Raised for permanent failures: a rejected recipient, failed authentication,
    or bad input (header injection, unreadable attachment). ``smtp_code`` is the
    server's reply code when there was one.
    """

    code = "send_failed"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        smtp_code: int | None = None,
        recipient: str | None = None,
        message_id: str | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.smtp_code = smtp_code
        self.recipient = recipient
        self.message_id = message_id


class StorageError(ChannelError):
    """The state in ``state_dir`` could not be read or written.

    ``code``: ``storage_full`` (no space left), ``storage_readonly`` (read-only or
    not writable by this user, or a state dir that cannot be created) or
    ``storage_error`` (any other I/O or database failure). ``path`` names the file
    or directory. The running channel pauses and retries rather than raising this.
    """

    code = "storage_error"

    def __init__(self, message: str, *, code: str | None = None, path: str = "") -> None:
        super().__init__(message, code=code)
        self.path = path


class OAuthReauthRequired(AuthenticationError):
    """The OAuth grant is gone (revoked, expired, never stored): a person must sign in
    again with ``prx-email auth login``. Retrying without that cannot help."""

    code = "oauth_reauth_required"


class OAuthUnavailable(TransportError):
    """The token endpoint could not be reached or answered 5xx/429: retried with backoff."""

    code = "oauth_token_unavailable"
