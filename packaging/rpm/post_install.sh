# glance-cached: the service user (as Glance's packages use), the cache directory, the
# state directory holding the SQLite database (outside the cache, where Glance deletes
# files), and read access to the configuration for the service group.
getent group glance >/dev/null || groupadd --system glance
getent passwd glance >/dev/null || useradd --system --gid glance --home-dir /var/lib/glance \
    --no-create-home --shell /sbin/nologin --comment "OpenStack Glance" glance
install -d -o glance -g glance -m 0750 /var/lib/glance /var/lib/glance/image-cache
install -d -o glance -g glance -m 0750 /var/lib/glance-cached
chown root:glance /etc/glance-cached /etc/glance-cached/glance-cached.toml
chmod 0750 /etc/glance-cached
chmod 0640 /etc/glance-cached/glance-cached.toml
if [ -d /run/systemd/system ]; then systemctl daemon-reload >/dev/null 2>&1 || true; fi
