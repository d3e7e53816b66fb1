# Sourced by the scripts that build glance-cached. The build links the system's OpenSSL
# for its digests (MD5 and SHA-2 in assembly), so it needs OpenSSL's headers and
# pkg-config (Debian's libssl-dev and pkg-config); the tests also run the `openssl`
# command. Installed here when missing (as root).
# shellcheck source=scripts/lib/apt.sh
. "$(dirname "${BASH_SOURCE[0]}")/apt.sh"
if ! pkg-config --exists openssl 2>/dev/null || ! command -v openssl >/dev/null; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    apt_install libssl-dev pkg-config openssl
  else
    echo "$(basename "$0"): the build needs OpenSSL's headers and pkg-config, the tests the openssl command (Debian: apt-get install libssl-dev pkg-config openssl)" >&2
  fi
fi
