# Shared by scripts/test, scripts/demo and scripts/bench: make .venv and install what is
# missing (pip packages; Debian's iptables, nftables, python3-nftables and iproute2 when root
# and they are absent).
# Usage: source scripts/_setup.sh; netvm_setup EXTRA   (EXTRA: test, bench or "")
VENV=${NETVM_VENV:-.venv}

netvm_have_xtables() {
    # grep without -q reads all of ldconfig's output (no SIGPIPE under pipefail)
    ldconfig -p 2>/dev/null | grep 'libip4tc\.so' >/dev/null &&
        { compgen -G '/usr/lib/*/xtables' || compgen -G '/usr/lib*/xtables'; } >/dev/null &&
        command -v iptables-legacy >/dev/null 2>&1
}

netvm_have_nftables() {
    # libnftables' official Python binding (it brings libnftables1) and the nft command
    [ -f /usr/lib/python3/dist-packages/nftables/nftables.py ] && command -v nft >/dev/null 2>&1
}

netvm_setup() {
    local extra=${1:-}
    if ! netvm_have_xtables || ! netvm_have_nftables || ! command -v ip >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            echo "== installing Debian's iptables, nftables, python3-nftables and iproute2"
            # Wait for a dpkg lock held by another installer instead of failing at once.
            apt-get -o DPkg::Lock::Timeout=300 update -qq >/dev/null
            DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 \
                install -y -qq iptables nftables python3-nftables iproute2 >/dev/null
        else
            echo "note: Debian's iptables/nftables packages are missing and this is not root:" \
                "kernel tests will be skipped" >&2
        fi
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        echo "== creating $VENV"
        python3 -m venv "$VENV"
    fi
    local spec=".${extra:+[$extra]}"
    local stamp="$VENV/.netvm-installed-${extra:-base}"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        echo "== installing netvm${extra:+ with [$extra]} into $VENV"
        "$VENV/bin/pip" install -q --disable-pip-version-check -e "$spec"
        touch "$stamp"
    fi
}
