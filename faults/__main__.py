"""`python -m faults [-faults N] [-seed S] [-keep DIR] [-check-each]`: run the fault campaign.

Prints progress on stderr and one summary line on stdout; the exit status is
1 when any commit was accepted twice for one TXID, any history is corrupt, or
any node diverged once healed; with `-check-each`, also as soon as a node's
database reads as damaged after a fault, leaving the cluster's logs ending
where the damage began.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from faults.campaign import Campaign, DamageFound
from faults.cluster import DB, Cluster
from faults.network import NetworkError
from faults.verdict import judge
from faults.workload import Ledger, Reader, Writer

SCHEMA = "CREATE TABLE t (writer INTEGER, seq INTEGER, node TEXT, pos TEXT);"
WARM_UP = 2.0


def _interrupted(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m faults", description=__doc__)
    parser.add_argument(
        "-faults", type=int, default=int(os.environ.get("FAULTS", "1000")), help="faults to inject"
    )
    parser.add_argument("-seed", type=int, default=None, help="random seed (printed if not given)")
    parser.add_argument("-keep", default=None, help="keep data, mounts' dirs and logs here")
    parser.add_argument(
        "-check-each",
        action="store_true",
        help="quick_check every node after each fault; stop at the first damage",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    if args.faults < 1:
        print("python -m faults: -faults must be at least 1", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    signal.signal(signal.SIGTERM, _interrupted)
    began = time.monotonic()

    def progress(text: str) -> None:
        print(f"[{time.monotonic() - began:7.1f}s] {text}", file=sys.stderr, flush=True)

    if args.keep:
        root = Path(args.keep).resolve()
        root.mkdir(parents=True, exist_ok=True)
    else:
        root = Path(tempfile.mkdtemp(prefix="litefs-faults-"))
    progress(f"seed {seed}, {args.faults} faults, cluster in {root}")
    cluster = Cluster(root)
    ledger = Ledger()
    threads: list[Writer | Reader] = []
    try:
        try:
            cluster.start()
        except NetworkError as exc:
            print(f"python -m faults: cannot build the network namespaces: {exc}", file=sys.stderr)
            return 2
        leader = cluster.wait_elected(30.0)
        if leader is None:
            print("python -m faults: no primary was elected", file=sys.stderr)
            return 1
        leader.sqlite(DB, SCHEMA)
        threads = [Writer(i + 1, cluster, ledger) for i in range(len(cluster.nodes))]
        threads.append(Reader(cluster, ledger))
        for thread in threads:
            thread.start()
        time.sleep(WARM_UP)
        campaign = Campaign(
            cluster, random.Random(seed), partitions=True, check_each=args.check_each
        )
        since = time.monotonic()
        try:
            campaign.run(args.faults, progress)
        except DamageFound as exc:
            progress(f"damage {exc}")
            print(f"faults={len(campaign.faults)} damaged: {exc}", flush=True)
            return 1
        until = time.monotonic()
        for thread in threads:
            thread.stopping.set()
        for thread in threads:
            thread.join()
        progress(
            f"{len(ledger.acks)} commits acknowledged of {ledger.attempts} tried, "
            f"{ledger.checks} replica reads checked; healing and checking"
        )
        verdict = judge(cluster, ledger, campaign.faults, since, until)
        for line in [*verdict.details, *ledger.violations]:
            progress(line)
        per_fault = (until - since) / max(1, len(campaign.faults))
        progress(f"{per_fault:.1f}s per fault; {len(ledger.violations)} replica read violations")
        print(verdict.summary(), flush=True)
        return 1 if verdict.failed or ledger.violations else 0
    except KeyboardInterrupt as exc:
        print(f"python -m faults: interrupted ({exc}); cleaning up", file=sys.stderr)
        return 130
    finally:
        for thread in threads:
            thread.stopping.set()
        cluster.close()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
