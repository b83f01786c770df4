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
APT_PACKAGES=(dovecot-imapd dovecot-lmtpd notmuch)
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

# --- Python: the package and its test dependencies -------------------------------
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
# The host-framework extras too, so the integration tests run (they skip without them).
"$PYTHON" -m pip install -q -e ".[test,nanobot,hermes]"

# --- run -------------------------------------------------------------------------
# pytest's exit status is ours (5 = no tests collected counts as a failure).
exec "$PYTHON" -m pytest -q "$@"
