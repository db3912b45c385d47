"""`litefs import` and `litefs export`: whole databases into and out of the
cluster, through a running node's HTTP API.

An import goes to the primary, which checks the file in full and replaces or
creates the database as one snapshot that replicas receive like any other
transaction. An export comes from any node, and appears at its destination
only once complete (a temporary file beside it, renamed into place).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import BinaryIO

from litefs.cli import CommandError
from litefs.cli.daemon import add_config_flag, error_message, node_token, node_url

TRANSFER_TIMEOUT = 3600.0
BLOCK = 1 << 20


def register(commands: argparse._SubParsersAction) -> None:
    importing = commands.add_parser(
        "import",
        help="load a SQLite file into the cluster as database NAME (on the primary)",
        description="Load a SQLite file into the cluster through a node's HTTP API. The "
        "primary checks it (header, page size, integrity_check) and replaces or creates the "
        "database as one snapshot; a bad file changes nothing. A replica refuses and names "
        "the primary.",
    )
    _add_common(importing)
    importing.add_argument("file", metavar="FILE", help="the SQLite file to load")
    importing.set_defaults(handler=run_import)

    exporting = commands.add_parser(
        "export",
        help="write a consistent copy of database NAME to FILE (from any node)",
        description="Write a consistent copy of a database from any node to FILE, through "
        "a temporary file renamed into place.",
    )
    _add_common(exporting)
    exporting.add_argument("file", metavar="FILE", help="where to write the copy")
    exporting.set_defaults(handler=run_export)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-name", "--name", required=True, metavar="NAME", help="the database's name in the mount"
    )
    parser.add_argument(
        "-url",
        "--url",
        metavar="URL",
        help="the node's HTTP URL (default: this node's http.addr from the configuration)",
    )
    add_config_flag(parser)


def _target(args: argparse.Namespace, path: str) -> tuple[str, str]:
    url = node_url(args)
    return url, f"{url}{path}?{urllib.parse.urlencode({'name': args.name})}"


def _authorization(args: argparse.Namespace) -> dict[str, str]:
    token = node_token(args)
    return {"Authorization": f"Bearer {token}"} if token else {}


def run_import(args: argparse.Namespace) -> int:
    source = Path(args.file)
    try:
        f = open(source, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise CommandError(f"{source}: {exc.strerror or exc}") from None
    url, target = _target(args, "/import")
    with f:
        answer = _upload(url, target, f, _authorization(args))
    print(f"{source}: imported as {args.name} at TXID {answer['txid']}/{answer['checksum']}")
    return 0


def _upload(url: str, target: str, f: BinaryIO, headers: dict[str, str]) -> dict[str, str]:
    """POST a file in large blocks (urllib sends 8 KiB at a time)."""
    parts = urllib.parse.urlsplit(target)
    connection_class = (
        http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    )
    connection = connection_class(parts.netloc, timeout=TRANSFER_TIMEOUT, blocksize=BLOCK)
    try:
        connection.request(
            "POST",
            f"{parts.path}?{parts.query}",
            body=f,
            headers={
                **headers,
                "Content-Type": "application/vnd.sqlite3",
                "Content-Length": str(os.fstat(f.fileno()).st_size),
            },
        )
        response = connection.getresponse()
        body = response.read()
    except OSError as exc:
        raise CommandError(f"cannot reach {url}: {exc.strerror or exc}") from None
    finally:
        connection.close()
    try:
        answer: dict[str, str] = json.loads(body)
    except ValueError:
        answer = {}
    if response.status != 200:
        message = answer.get("error", response.reason) if isinstance(answer, dict) else body
        raise CommandError(f"import refused ({response.status}): {message}")
    return answer


def run_export(args: argparse.Namespace) -> int:
    out = Path(args.file)
    if out.is_dir():
        raise CommandError(f"{out}: Is a directory")
    url, target = _target(args, "/export")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    except OSError as exc:
        raise CommandError(f"{out}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            position = _download(url, target, f, _authorization(args))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    print(f"{out}: copy of {args.name} at {position}")
    return 0


def _download(url: str, target: str, f: BinaryIO, headers: dict[str, str]) -> str:
    request = urllib.request.Request(target, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=TRANSFER_TIMEOUT) as response:
            while block := response.read(BLOCK):
                f.write(block)
            return str(response.headers.get("LiteFS-Position", "?"))
    except urllib.error.HTTPError as exc:
        raise CommandError(f"export refused ({exc.code}): {error_message(exc)}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise CommandError(f"cannot reach {url}: {getattr(exc, 'reason', exc)}") from None
