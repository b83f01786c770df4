#!/usr/bin/env bash
# The one test command, locally and in CI.
#
# On a fresh Debian machine it installs what the tests need (only what is
# missing), installs this package with its test extra, then runs pytest.
# Arguments are passed on to pytest:  bash tests/run.sh -k smtp -x
set -euo pipefail
cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

# --- system packages: real servers the tests run against ------------------------
APT_PACKAGES=(dovecot-imapd dovecot-lmtpd notmuch postgresql pgbouncer libsasl2-modules)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
if ! command -v dovecot >/dev/null 2>&1 && [ ! -x /usr/sbin/dovecot ]; then
    missing+=(dovecot-core)
fi
if [ "${#missing[@]}" -gt 0 ]; then
    SUDO=()
    if [ "$(id -u)" -ne 0 ]; then SUDO=(sudo); fi
    echo "tests/run.sh: installing ${missing[*]}" >&2
    # Keep the packages' own system-wide Dovecot from being started: the tests run
    # their own instances (policy-rc.d exit 101 = "service start not allowed").
    policy=/usr/sbin/policy-rc.d
    added_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$policy" >/dev/null
        "${SUDO[@]}" chmod 755 "$policy"
        added_policy=1
    fi
    cleanup_policy() { if [ "$added_policy" = 1 ]; then "${SUDO[@]}" rm -f "$policy"; fi; }
    trap cleanup_policy EXIT
    "${SUDO[@]}" apt-get update -q
    "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
    cleanup_policy
    trap - EXIT
fi

# --- Cyrus IMAP: unpacked into a private prefix, never installed -------------------
# Debian's cyrus-imapd conflicts with dovecot-imapd. tests/servers/cyrus.py runs it
# from here (readable by all users: Cyrus's processes run as an unprivileged one).
CYRUS_ROOT="${PRX_TEST_CYRUS_ROOT:-/opt/prx-test-cyrus/root}"
if [ ! -x "$CYRUS_ROOT/usr/lib/cyrus/bin/master" ]; then
    SUDO=()
    if [ "$(id -u)" -ne 0 ]; then SUDO=(sudo); fi
    debs=$(mktemp -d "${TMPDIR:-/tmp}/prx-cyrus.XXXXXX")
    chmod 777 "$debs"  # apt-get download writes as the _apt user
    echo "tests/run.sh: unpacking Cyrus IMAP into $CYRUS_ROOT" >&2
    cyrus_debs=(cyrus-imapd cyrus-common libpcre3 libical3 sasl2-bin)
    if ! (cd "$debs" && apt-get download -q "${cyrus_debs[@]}"); then
        "${SUDO[@]}" apt-get update -q  # no package lists yet
        (cd "$debs" && apt-get download -q "${cyrus_debs[@]}")
    fi
    "${SUDO[@]}" mkdir -p "$CYRUS_ROOT"
    for deb in "$debs"/*.deb; do "${SUDO[@]}" dpkg -x "$deb" "$CYRUS_ROOT"; done
    "${SUDO[@]}" chmod 755 "$(dirname "$CYRUS_ROOT")" "$CYRUS_ROOT"
    rm -rf "$debs"
fi

# --- Python: the package and its test dependencies -------------------------------
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
# The host-framework extras too, so the integration tests run (they skip without them).
# The docs extra too: CI builds the documentation site below.
"$PYTHON" -m pip install -q -e ".[test,nanobot,hermes,docs]"

# --- gates that are not tests: import rules and the documentation site -------------
if [ "$#" -eq 0 ]; then
    lint-imports
    site=$(mktemp -d "${TMPDIR:-/tmp}/prx-site.XXXXXX")
    NO_MKDOCS_2_WARNING=1 "$PYTHON" -m mkdocs build --strict -q -d "$site"
    rm -rf "$site"
    echo "tests/run.sh: lint-imports and mkdocs build --strict passed" >&2
fi

# --- what users install: the wheel, non-editable, in a fresh virtualenv -----------
# The suite below runs from the checkout, where a file missing from the wheel goes
# unnoticed. Here the built wheel is installed with both host extras into a new venv,
# and the wheel checks plus the host-integration tests run from a copy of tests/ with
# no source tree beside it. Skipped when arguments select tests (a quick local run).
if [ "$#" -eq 0 ] || [ "${PRX_WHEEL_STAGE:-}" = 1 ]; then
    stage=$(mktemp -d "${TMPDIR:-/tmp}/prx-wheel.XXXXXX")
    trap 'rm -rf "$stage"' EXIT
    mkdir -p "$stage/src"
    # A clean copy to build from: setuptools would reuse a stale build/ of the checkout.
    cp -r pyproject.toml README.md prx_channel_email "$stage/src/"
    find "$stage/src" -name __pycache__ -prune -exec rm -rf {} +
    "$PYTHON" -m pip wheel -q --no-deps -w "$stage/dist" "$stage/src"
    wheel=$(ls "$stage"/dist/prx_channel_email-*.whl)
    "$PYTHON" -m venv "$stage/venv"
    "$stage/venv/bin/python" -m pip install -q "${wheel}[test,nanobot,hermes]"
    mkdir -p "$stage/run"
    cp -r tests pyproject.toml "$stage/run/"
    echo "tests/run.sh: wheel stage: $(basename "$wheel") installed non-editable" >&2
    (cd "$stage/run" && PRX_TEST_INSTALLED=1 PRX_WHEEL="$wheel" PRX_SOURCE_ROOT="$OLDPWD" \
        "$stage/venv/bin/python" -m pytest -q -p no:cacheprovider \
        tests/test_wheel.py tests/test_integration_nanobot.py \
        tests/test_integration_nanobot_gateway.py tests/test_integration_hermes.py \
        tests/test_integration_hermes_gateway.py)
    rm -rf "$stage"
    trap - EXIT
fi

# --- run -------------------------------------------------------------------------
# pytest's exit status is ours (5 = no tests collected counts as a failure).
exec "$PYTHON" -m pytest -q "$@"
