# $1 is 0 on erase, 1 on upgrade.
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
    systemctl stop glance-cached.service >/dev/null 2>&1 || true
    systemctl disable glance-cached.service >/dev/null 2>&1 || true
fi
