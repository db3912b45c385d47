"""A bug in one file operation costs that operation, never the mount."""

from __future__ import annotations

import errno
import inspect
import logging
from collections.abc import Sequence

import pyfuse3
import pytest
import trio

from litefs.fuse import FileSystem, _guard_handlers


@_guard_handlers
class Broken(pyfuse3.Operations):
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise KeyError(inode)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        raise pyfuse3.FUSEError(errno.ENOSPC)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        raise RuntimeError("forgot badly")


def test_an_unexpected_exception_is_logged_and_answered_eio(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with (
        caplog.at_level(logging.ERROR, logger="litefs.fuse"),
        pytest.raises(pyfuse3.FUSEError) as raised,
    ):
        trio.run(Broken().getattr, 7, None)
    assert raised.value.errno == errno.EIO
    assert "file operation getattr failed" in caplog.text
    assert "KeyError: 7" in caplog.text


def test_a_deliberate_fuse_error_passes_unchanged() -> None:
    with pytest.raises(pyfuse3.FUSEError) as raised:
        trio.run(Broken().statfs, None)
    assert raised.value.errno == errno.ENOSPC


def test_an_operation_the_kernel_expects_no_answer_to_only_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, logger="litefs.fuse"):
        trio.run(Broken().forget, [(7, 1)])
    assert "forgot badly" in caplog.text


def test_every_operation_of_the_mount_is_guarded() -> None:
    handlers = [
        name
        for name, handler in vars(pyfuse3.Operations).items()
        if inspect.iscoroutinefunction(handler) and name in vars(FileSystem)
    ]
    assert {"lookup", "getattr", "read", "write", "readdir", "release", "forget"} <= set(handlers)
    for name in handlers:
        assert hasattr(getattr(FileSystem, name), "__wrapped__"), name
