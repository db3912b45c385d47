"""What a database may be called: a path in the mount, and never a name
the mount keeps for a file it generates."""

from __future__ import annotations

from pathlib import PurePosixPath


class InvalidName(ValueError):
    """A database name that could escape the data directory or is malformed."""


def check_name(name: str) -> str:
    """Validate a database name: a relative path without `.`/`..` parts."""
    path = PurePosixPath(name)
    if (
        not name
        or path.is_absolute()
        or "\x00" in name
        or any(part in ("", ".", "..") for part in name.split("/"))
        or len(name.encode()) > 1024
    ):
        raise InvalidName(f"invalid database name: {name!r}")
    return name


RESERVED_NAMES = (".primary", ".lag")
"""Files the mount generates in its root."""
POSITION_SUFFIX = "-pos"


class ReservedName(InvalidName):
    """A name the mount keeps for a file it generates."""


def check_new_name(name: str) -> str:
    """A name a new database or directory may take: a valid name that does
    not collide with a file the mount generates. A database `bar-pos` would
    hide the position file of `bar`, so no name ends in `-pos`."""
    check_name(name)
    if name in RESERVED_NAMES:
        raise ReservedName(f"{name} is reserved: the mount generates it")
    if name.rsplit("/", 1)[-1].endswith(POSITION_SUFFIX):
        raise ReservedName(
            f"{name}: database names may not end in {POSITION_SUFFIX}, "
            f"which names the position file of {name[: -len(POSITION_SUFFIX)]}"
        )
    return name
