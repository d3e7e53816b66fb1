#!/usr/bin/env python3
"""The real Glance 33.0.0 ``centralized_db`` driver's figures, for benches/driver.rs.

The driver benchmark fills a cache (files and rows, as for its own figures) on a
database Glance synced, then runs this script with the Glance virtualenv's python on
it, right before measuring glance-cached on the same population. It reuses
tests/glance/glance_cache.py's configuration (oslo.config overrides, no config file).

    python glance_driver.py --cache-dir D --db-url URL --node-url N db-sync
    python glance_driver.py ... ops --count N --ops K --rounds R
    python glance_driver.py ... prune --max-size BYTES
    python glance_driver.py ... clean --stall-time SECONDS

Each prints one JSON object on stdout: operations per second (medians of the rounds)
or seconds and files for prune and clean. Timings are taken inside the process, after
Glance is imported and configured, as the Rust side times its own calls.
"""

import argparse
import json
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "..", "tests", "glance"))
import glance_cache  # noqa: E402


def image_id(n):
    """The ids benches/driver.rs gives its images."""
    return f"{n:08x}-0000-4000-8000-000000000000"


def rate(count, op):
    started = time.perf_counter()
    for i in range(count):
        op(i)
    return count / (time.perf_counter() - started)


def bare_creates(queue_dir, count, r):
    """Exclusive creates of empty files in `queue_dir`, as driver.rs makes them in its
    own: the directory's cost of a marker alone (ext4's cost of a create differs by up
    to 20x between directories of one disk), then removed, untimed."""
    names = [os.path.join(queue_dir, f"zz{r}-{i}") for i in range(count)]
    started = time.perf_counter()
    for name in names:
        os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640))
    rate = count / (time.perf_counter() - started)
    for name in names:
        os.unlink(name)
    return rate


def ops(driver, n, count, queue_count, rounds, cache_dir):
    """The per-operation rates, in the order and with the picks of driver.rs."""
    figures = {k: [] for k in ("is_cached", "open_for_read", "get_hit_count",
                               "queue_image", "queue_dir_create", "list_ms")}
    for r in range(rounds):
        def pick(i, r=r):
            return image_id((i * 7919 + r) % n)

        def is_cached(i):
            assert driver.is_cached(pick(i))

        def read(i):
            with driver.open_for_read(pick(i)):
                pass

        def hits(i):
            driver.get_hit_count(pick(i))

        def queue(i, r=r):
            assert driver.queue_image(f"q{r}-{i}")

        figures["is_cached"].append(rate(count, is_cached))
        figures["open_for_read"].append(rate(count, read))
        figures["get_hit_count"].append(rate(count, hits))
        figures["queue_image"].append(rate(queue_count, queue))
        figures["queue_dir_create"].append(
            bare_creates(os.path.join(cache_dir, "queue"), queue_count, r))
        started = time.perf_counter()
        listed = driver.get_cached_images()
        figures["list_ms"].append((time.perf_counter() - started) * 1000)
        assert len(listed) == n, len(listed)
        driver.delete_all_queued_images()
    return {k: statistics.median(v) for k, v in figures.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache-dir", required=True)
    p.add_argument("--db-url", required=True)
    p.add_argument("--node-url", required=True)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("db-sync")
    o = sub.add_parser("ops")
    o.add_argument("--count", type=int, required=True, help="images cached")
    o.add_argument("--ops", type=int, required=True, help="calls per figure")
    o.add_argument("--queue-ops", type=int,
                   help="queue_image calls per figure, and bare creates (default: --ops);"
                        " as many as ours, so both queue/ directories grow alike")
    o.add_argument("--rounds", type=int, default=3)
    pr = sub.add_parser("prune")
    pr.add_argument("--max-size", type=int, required=True)
    c = sub.add_parser("clean")
    c.add_argument("--stall-time", type=int, required=True)
    args = p.parse_args()
    warnings.simplefilter("ignore")  # eventlet/alembic deprecation noise
    conf = argparse.Namespace(
        cache_dir=args.cache_dir, db_url=args.db_url, node_url=args.node_url,
        max_size=getattr(args, "max_size", None),
        stall_time=getattr(args, "stall_time", None))
    glance_cache.configure(conf)
    if args.command == "db-sync":
        result = glance_cache.db_sync()
    elif args.command == "ops":
        driver = glance_cache.make_driver()
        result = ops(driver, args.count, args.ops, args.queue_ops or args.ops,
                     args.rounds, args.cache_dir)
    elif args.command == "prune":
        import glance.image_cache
        cache = glance.image_cache.ImageCache()
        started = time.perf_counter()
        files, size = cache.prune()
        result = {"seconds": time.perf_counter() - started, "files": files,
                  "bytes": size}
    else:
        driver = glance_cache.make_driver()
        before = sum(len(os.listdir(os.path.join(args.cache_dir, d)))
                     for d in ("incomplete", "invalid"))
        started = time.perf_counter()
        driver.clean(stall_time=args.stall_time)
        secs = time.perf_counter() - started
        after = sum(len(os.listdir(os.path.join(args.cache_dir, d)))
                    for d in ("incomplete", "invalid"))
        result = {"seconds": secs, "files": before - after}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
