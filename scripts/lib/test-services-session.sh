# Sourced (as root) by scripts/test and scripts/bench: waits for any other such run on
# this machine, starts PostgreSQL and MariaDB on loopback, exports their URLs, and stops
# them when the sourcing script exits. One run at a time: the servers live in one shared
# directory, and a run stops them when it ends, which would pull them from under another.
# The lock is fd 9; children that may outlive the run (the servers) do not inherit it.
exec 9>/tmp/glance-cached-test.lock
if ! flock -n 9; then
  echo "$(basename "$0"): waiting for another test or bench run on this machine to finish" >&2
  flock 9
fi
services_env_file=$(mktemp)
trap 'scripts/test-services stop 9>&- || true; rm -f "$services_env_file"' EXIT
scripts/test-services start 9>&- >"$services_env_file"
# shellcheck disable=SC1090
. "$services_env_file"
