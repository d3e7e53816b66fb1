#!/usr/bin/env python3
"""Command-line wrapper around OpenStack Glance's real image-cache driver.

glance-cached's interop tests use it to run the real Glance 33.0.0
``centralized_db`` driver (glance.image_cache.drivers.centralized_db.Driver)
against the same cache directory and database as glance-cached, so that each
side can check what the other wrote. It is configured only through oslo.config
overrides; no Glance config file is read.

    python glance_cache.py --cache-dir D --db-url URL --node-url N COMMAND [ARGS]

Every command prints one JSON value on stdout; logging goes to stderr. On error
the exit status is non-zero and a one-line message is printed on stderr.
Run it with the python printed by scripts/glance-venv.
"""

import argparse
import contextlib
import hashlib
import json
import logging
import sys
import warnings

LOG = logging.getLogger("glance_cache")

# command name -> (positional args, help)
COMMANDS = {
    "db-sync": ([], "create/upgrade Glance's schema (glance-manage db sync)"),
    "write": (["id", "file"], "cache FILE as image ID via open_for_write"),
    "read": (["id"], "open_for_read(ID); print md5 hex of the bytes"),
    "list-cached": ([], "get_cached_images()"),
    "hits": (["id"], "get_hit_count(ID)"),
    "is-cached": (["id"], "is_cached(ID)"),
    "queue": (["id"], "queue_image(ID)"),
    "list-queued": ([], "get_queued_images()"),
    "delete-queued": (["id"], "delete_queued_image(ID)"),
    "delete-all-queued": ([], "delete_all_queued_images()"),
    "delete-cached": (["id"], "delete_cached_image(ID)"),
    "delete-all-cached": ([], "delete_all_cached_images(); prints count"),
    "clean": ([], "clean() with image_cache_stall_time"),
    "size": ([], "get_cache_size()"),
    "lru": ([], "get_least_recently_accessed(): [id, size] or null"),
    "prune": ([], "ImageCache().prune(): [files, bytes]. NB: Glance loops "
                  "forever if the cache is over max size and the node has "
                  "no rows"),
    "hold-locks": (["ready", "release"],
                   "take the external locks Glance keeps in the cache "
                   "directory, touch READY, hold them until RELEASE exists"),
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache-dir", required=True, help="image_cache_dir")
    p.add_argument("--db-url", required=True,
                   help="[database] connection, e.g. sqlite:////abs/x.db")
    p.add_argument("--node-url", required=True,
                   help="worker_self_reference_url (the node's key)")
    p.add_argument("--max-size", type=int, help="image_cache_max_size")
    p.add_argument("--stall-time", type=int, help="image_cache_stall_time")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="debug logging (stderr)")
    sub = p.add_subparsers(dest="command", required=True)
    for name, (params, helptext) in COMMANDS.items():
        sp = sub.add_parser(name, help=helptext)
        for param in params:
            sp.add_argument(param)
    return p.parse_args(argv)


def configure(args):
    """Register Glance's options and override them; no config files."""
    from oslo_config import cfg
    from oslo_db import options as db_options
    import glance.common.config  # noqa: F401  worker_self_reference_url
    import glance.image_cache  # noqa: F401  image_cache_* options

    conf = cfg.CONF
    db_options.set_defaults(conf)
    conf([], project="glance", default_config_files=[],
         default_config_dirs=[])
    conf.set_override("connection", args.db_url, group="database")
    conf.set_override("image_cache_dir", args.cache_dir)
    conf.set_override("worker_self_reference_url", args.node_url)
    conf.set_override("image_cache_driver", "centralized_db")
    if args.max_size is not None:
        conf.set_override("image_cache_max_size", args.max_size)
    if args.stall_time is not None:
        conf.set_override("image_cache_stall_time", args.stall_time)


def db_sync():
    """What `glance-manage db sync` does: expand, migrate, contract."""
    from glance.cmd import manage
    from glance.db.sqlalchemy import alembic_migrations

    with contextlib.redirect_stdout(sys.stderr):  # glance-manage prints
        try:
            manage.DbCommands().sync()
        except SystemExit as e:  # "up to date" exits 0, errors exit with text
            if e.code not in (None, 0):
                raise RuntimeError(f"db sync failed: {e.code}") from None
    return sorted(alembic_migrations.get_current_alembic_heads())


def make_driver():
    from glance.image_cache.drivers import centralized_db
    driver = centralized_db.Driver()
    driver.configure()  # creates incomplete/ invalid/ queue/, node row
    return driver


def write(driver, image_id, path):
    with open(path, "rb") as src, driver.open_for_write(image_id) as dst:
        for chunk in iter(lambda: src.read(1 << 20), b""):
            dst.write(chunk)
    return driver.get_image_size(image_id)


def read(driver, image_id):
    md5 = hashlib.md5()
    with driver.open_for_read(image_id) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            md5.update(chunk)
    return md5.hexdigest()


def lru(driver):
    image_id, size = driver.get_least_recently_accessed()
    return None if image_id is None else [image_id, size]


def hold_locks(ready, release):
    """Glance's own lock calls, in the lock_path its driver's configure() set to
    the cache directory: the prefetcher's, the cache API's clean and prune, and
    the import cancellation tracker's. Returns the lock files' names."""
    import os
    import time
    from oslo_concurrency import lockutils
    from glance import task_cancellation_tracker  # noqa: F401  same oslo calls

    names = ["glance-cache", "glance-cache-clean", "glance-cache-prune"]
    with contextlib.ExitStack() as stack:
        for name in names:
            stack.enter_context(lockutils.lock(name, external=True))
        stack.enter_context(lockutils.external_lock("tasks"))
        open(ready, "w").close()
        deadline = time.monotonic() + 120
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.02)
    return names + ["tasks"]


def run(args):
    if args.command == "db-sync":
        return db_sync()
    if args.command == "prune":
        import glance.image_cache
        return list(glance.image_cache.ImageCache().prune())
    d = make_driver()
    i = getattr(args, "id", None)
    actions = {
        "write": lambda: write(d, i, args.file),
        "read": lambda: read(d, i),
        "list-cached": d.get_cached_images,
        "hits": lambda: d.get_hit_count(i),
        "is-cached": lambda: d.is_cached(i),
        "queue": lambda: d.queue_image(i),
        "list-queued": d.get_queued_images,
        "delete-queued": lambda: d.delete_queued_image(i),
        "delete-all-queued": d.delete_all_queued_images,
        "delete-cached": lambda: d.delete_cached_image(i),
        "delete-all-cached": d.delete_all_cached_images,
        "clean": d.clean,
        "size": d.get_cache_size,
        "lru": lambda: lru(d),
        "hold-locks": lambda: hold_locks(args.ready, args.release),
    }
    return actions[args.command]()


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(stream=sys.stderr,
                        level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # eventlet/alembic deprecation noise
        warnings.simplefilter("ignore")
    try:
        configure(args)
        result = run(args)
    except Exception as e:
        LOG.debug("failed", exc_info=True)
        print(f"glance_cache.py {args.command}: {type(e).__name__}: {e}",
              file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
