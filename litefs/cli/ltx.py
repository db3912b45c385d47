"""`litefs ltx ...`: operator tools for LTX files.

The commands and their flags follow the reference `ltx` tool, so that an
operator's habits and scripts carry over: verify, list, dump, checksum, apply
and encode-db.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from litefs import ltx
from litefs.cli import CommandError, Parser

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
LIST_COLUMNS = (
    "file",
    "min_txid",
    "max_txid",
    "commit",
    "pages",
    "preapply",
    "postapply",
    "timestamp",
    "wal_offset",
    "wal_size",
    "wal_salt",
)


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "ltx",
        help="inspect, verify, apply and create LTX files",
        description="Inspect, verify, apply and create LTX files.",
    )
    sub = parser.add_subparsers(
        title="commands", metavar="COMMAND", parser_class=Parser, required=True
    )

    verify = sub.add_parser("verify", help="check LTX files completely")
    verify.add_argument("files", nargs="+", metavar="FILE")
    verify.set_defaults(handler=run_verify)

    listing = sub.add_parser("list", help="one line of header and trailer fields per LTX file")
    listing.add_argument("files", nargs="+", metavar="FILE")
    listing.set_defaults(handler=run_list)

    dump = sub.add_parser("dump", help="print the header, every page and the trailer of a file")
    dump.add_argument("file", metavar="FILE")
    dump.set_defaults(handler=run_dump)

    checksum = sub.add_parser("checksum", help="print the LTX checksum of a SQLite database")
    checksum.add_argument("db", metavar="DB")
    checksum.set_defaults(handler=run_checksum)

    apply = sub.add_parser(
        "apply",
        help="apply LTX files to a database in order",
        description="Apply LTX files to a database in order. Each file is verified and its "
        "pre-apply checksum compared with the database before anything is written; a missing "
        "database is created only when the first file is a snapshot.",
    )
    apply.add_argument("-db", "--db", required=True, metavar="DB", help="database file")
    apply.add_argument(
        "-force",
        "--force",
        action="store_true",
        help="let a snapshot replace a file that is not empty, or a file that is not a "
        "SQLite database",
    )
    apply.add_argument("files", nargs="+", metavar="FILE")
    apply.set_defaults(handler=run_apply)

    encode = sub.add_parser(
        "encode-db",
        help="write a snapshot LTX file of a SQLite database",
        description="Write a snapshot LTX file of a SQLite database. The output appears "
        "atomically: it is written to a temporary file beside OUT and renamed.",
    )
    encode.add_argument("db", metavar="DB")
    encode.add_argument("-o", "--o", "--output", dest="output", required=True, metavar="OUT")
    encode.add_argument(
        "-timestamp",
        "--timestamp",
        type=_non_negative,
        metavar="MS",
        help="milliseconds since the epoch (default: now)",
    )
    encode.add_argument(
        "-txid", "--txid", type=_txid, default=1, metavar="TXID", help="max TXID (default 1)"
    )
    encode.set_defaults(handler=run_encode_db)


def _reason(exc: Exception, path: str) -> str:
    """One line naming the file and what is wrong with it."""
    if isinstance(exc, OSError):
        where = exc.filename if exc.filename is not None else path
        return f"{where}: {exc.strerror or exc}"
    return f"{path}: {exc}"


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0 or value > 0xFFFFFFFFFFFFFFFF:
        raise argparse.ArgumentTypeError(f"{text} is out of range 0..2^64-1")
    return value


def _txid(text: str) -> int:
    value = _non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError("TXIDs start at 1")
    return value


def format_timestamp(ms: int) -> str:
    """RFC 3339 in UTC with milliseconds; the raw number when no calendar date fits."""
    try:
        moment = _EPOCH + timedelta(milliseconds=ms)
    except OverflowError:
        return f"{ms}ms"
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def run_verify(args: argparse.Namespace) -> int:
    status = 0
    for path in args.files:
        try:
            with open(path, "rb") as f:
                ltx.verify(f)
        except (OSError, ltx.LTXError) as exc:
            print(_reason(exc, path), file=sys.stderr)
            status = 1
            continue
        print(f"{path}: ok")
    return status


def run_list(args: argparse.Namespace) -> int:
    status = 0
    print("\t".join(LIST_COLUMNS))
    for path in args.files:
        try:
            with open(path, "rb") as f:
                dec = ltx.Decoder(f)
                for _ in dec.frames():
                    pass
        except (OSError, ltx.LTXError) as exc:
            print(_reason(exc, path), file=sys.stderr)
            status = 1
            continue
        h = dec.header
        t = dec.trailer
        assert t is not None
        fields = (
            path,
            f"{h.min_txid:016x}",
            f"{h.max_txid:016x}",
            str(h.commit),
            str(dec.page_count),
            f"{h.pre_apply_checksum:016x}",
            f"{t.post_apply_checksum:016x}",
            format_timestamp(h.timestamp),
            str(h.wal_offset),
            str(h.wal_size),
            f"{h.wal_salt1:08x} {h.wal_salt2:08x}",
        )
        print("\t".join(fields))
    return status


def run_dump(args: argparse.Namespace) -> int:
    path = args.file
    try:
        with open(path, "rb") as f:
            dec = ltx.Decoder(f)
            h = dec.header
            print("header:")
            print(f"  flags:              0x{h.flags:08x}")
            print(f"  page size:          {h.page_size}")
            print(f"  commit:             {h.commit}")
            print(f"  min TXID:           {h.min_txid:016x} ({h.min_txid})")
            print(f"  max TXID:           {h.max_txid:016x} ({h.max_txid})")
            print(f"  timestamp:          {format_timestamp(h.timestamp)} ({h.timestamp})")
            print(f"  pre-apply checksum: {h.pre_apply_checksum:016x}")
            print(f"  WAL offset:         {h.wal_offset}")
            print(f"  WAL size:           {h.wal_size}")
            print(f"  WAL salt:           {h.wal_salt1:08x} {h.wal_salt2:08x}")
            print(f"  node ID:            {h.node_id:016x}")
            print("pages:")
            for frame in dec.frames():
                checksum = ltx.page_checksum(frame.pgno, frame.data)
                print(
                    f"  page {frame.pgno}: offset {frame.offset}, {frame.size} bytes "
                    f"in the file, checksum {checksum:016x}"
                )
            t = dec.trailer
            assert t is not None
            print("trailer:")
            print(f"  post-apply checksum: {t.post_apply_checksum:016x}")
            print(f"  file checksum:       {t.file_checksum:016x}")
    except (OSError, ltx.LTXError) as exc:
        sys.stdout.flush()
        raise CommandError(_reason(exc, path)) from None
    return 0


def run_checksum(args: argparse.Namespace) -> int:
    try:
        value = ltx.database_checksum(args.db)
    except (OSError, ltx.LTXError) as exc:
        raise CommandError(_reason(exc, args.db)) from None
    print(f"{value:016x}")
    return 0


def _open_database(db: str, first: str) -> tuple[int, bool]:
    """Open the database, creating it only when the first file can fill it from nothing."""
    try:
        return os.open(db, os.O_RDWR), False
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise CommandError(_reason(exc, db)) from None
    try:
        with open(first, "rb") as f:
            header = ltx.Decoder(f).header
    except (OSError, ltx.LTXError) as exc:
        raise CommandError(_reason(exc, first)) from None
    if not header.is_snapshot:
        raise CommandError(
            f"{db}: no such database, and {first} is not a snapshot that could create it"
        )
    try:
        return os.open(db, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
    except OSError as exc:
        raise CommandError(_reason(exc, db)) from None


def run_apply(args: argparse.Namespace) -> int:
    db: str = args.db
    fd, created = _open_database(db, args.files[0])
    applied = 0
    try:
        if not created and not args.force:
            _refuse_unrelated(db, fd, args.files[0])
        for path in args.files:
            try:
                with open(path, "rb") as f:
                    header, trailer = ltx.apply_file(f, fd)
            except (OSError, ltx.LTXError) as exc:
                if created and applied == 0:
                    os.unlink(db)
                raise CommandError(_reason(exc, path)) from None
            applied += 1
            print(
                f"{path}: applied TXID {header.min_txid}..{header.max_txid}, "
                f"database checksum {trailer.post_apply_checksum:016x}"
            )
    finally:
        os.close(fd)
    return 0


def _refuse_unrelated(db: str, fd: int, first: str) -> None:
    """A file that is not a SQLite database, or that a snapshot would replace
    whole, is not touched without -force: the database the LTX files
    continue is the one whose checksum the first file names."""
    head = os.pread(fd, len(ltx.SQLITE_MAGIC), 0)
    if head and head != ltx.SQLITE_MAGIC:
        raise CommandError(f"{db}: not a SQLite database; refusing to overwrite it (use -force)")
    try:
        with open(first, "rb") as f:
            header = ltx.Decoder(f).header
    except (OSError, ltx.LTXError) as exc:
        raise CommandError(_reason(exc, first)) from None
    if header.is_snapshot and head:
        raise CommandError(
            f"{db}: {first} is a snapshot that would replace this database whole; "
            "refusing (use -force, or apply it to a new file)"
        )


def run_encode_db(args: argparse.Namespace) -> int:
    db: str = args.db
    out = Path(args.output)
    if out.is_dir():
        raise CommandError(f"{out}: Is a directory")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    except OSError as exc:
        raise CommandError(f"{out}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            header, trailer = ltx.encode_snapshot(db, f, txid=args.txid, timestamp=args.timestamp)
            f.flush()
            mask = os.umask(0)
            os.umask(mask)
            os.fchmod(f.fileno(), 0o666 & ~mask)
            os.fsync(f.fileno())
        os.replace(tmp, out)
        _fsync_dir(out.parent)
    except (OSError, ltx.LTXError) as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise CommandError(_reason(exc, db)) from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    print(
        f"{out}: snapshot of {db} at TXID {header.max_txid}, {header.commit} pages "
        f"of {header.page_size} bytes, database checksum {trailer.post_apply_checksum:016x}"
    )
    return 0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
