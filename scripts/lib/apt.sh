# Sourced by the scripts that install what a bare Debian machine lacks (as root).
# apt_install PACKAGE...: installs them, refreshing the package lists once per script.
apt_install() {
  if [[ -z ${apt_updated:-} ]]; then
    apt-get update -qq >&2
    apt_updated=1
  fi
  echo "$(basename "$0"): installing $*" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
}
