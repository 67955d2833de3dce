# Shell helpers shared by the scripts in this folder (sourced, not run).

# The checkout's top directory.
PYVMM_TOP=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

say() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }
die() { say "error: $*"; exit 1; }

# need_packages PKG...: install the Debian packages that are missing.
# Idempotent and quiet when everything is present.
need_packages() {
    local missing=() pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' ||
            missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        die "missing Debian packages: ${missing[*]} (run: sudo apt-get install ${missing[*]})"
    fi
    say "installing Debian packages: ${missing[*]}"
    # A fresh machine may have no package lists, or stale ones: on failure,
    # refresh them and try once more.
    local apt=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq
               --no-install-recommends "${missing[@]}")
    "${apt[@]}" >&2 2>/dev/null || {
        apt-get update -qq >&2 || die "apt-get update failed"
        "${apt[@]}" >&2 || die "apt-get install ${missing[*]} failed"
    }
}
