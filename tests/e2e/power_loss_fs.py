"""A filesystem that loses, on command, everything not yet synced to it: a power loss for the process above it.

Mounted (FUSE, :mod:`mfusepy`) over a backing directory, it passes every operation through, except that what was
done to a file's contents since its last ``fsync``/``fdatasync`` (which the kernel also sends after each write
through a descriptor opened ``O_SYNC`` or ``O_DSYNC``), writes and truncations, is kept in this process's memory,
not in the backing file, as a disk's volatile cache or the kernel's dirty pages would keep it. Reads see it.
``crash`` (a line on the control socket) drops it all at once and fails every later operation (``EIO``): what the
backing directory holds then is what a disk would hold after a power cut, and a PostgreSQL started on it must find
every transaction it reported committed (``fsync = on``, ``synchronous_commit = on``), and may lose any other.
``full`` makes it a full disk until ``room``: a write or truncation that would make a file longer fails (``ENOSPC``),
while one within a file's length (blocks it has, as PostgreSQL's recycled WAL segments and its pages) goes on;
``room`` is answered with the number of operations refused meanwhile.

The model is a disk that keeps what was synced and loses every other change to contents. Names and attributes
(create, rename, unlink, mkdir, ownership) reach the backing directory at once, as a journalling filesystem's
metadata usually would; so the model is stricter than a real disk about contents, gentler about names (PostgreSQL
syncs the directories whose names it relies on anyway). A synced file goes to the backing file without the backing
filesystem's own ``fsync``: the backing directory is the model's disk, not the machine's.

Run as ``python -m tests.e2e.power_loss_fs BACKING MOUNTPOINT CONTROL_SOCKET`` (as root: the mount is shared with
other users, ``allow_other``, so PostgreSQL's OS user can use it); it serves until unmounted. The control socket
takes ``crash``, answered ``crashed``; ``full``, answered ``full``; ``room``, answered ``room <refused>``.
"""

from __future__ import annotations

import errno
import functools
import os
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

from mfusepy import FUSE, FuseOSError, Operations, fuse_get_context

BLOCK = 8192
"""Unsynced contents are kept in blocks of this size (PostgreSQL's page)."""


class UnsyncedFile:
    """What was done to one file's contents since its last sync: whole blocks written, its size as the writer sees
    it, and the least size it had meanwhile (``floor``: beyond it the synced contents were cut away, so they read as
    zeros, and the sync cuts the backing file there before it writes the blocks)."""

    __slots__ = ("blocks", "floor", "size")

    def __init__(self, size: int) -> None:
        self.blocks: dict[int, bytearray] = {}
        self.size = size
        self.floor = size


def _operation(method: Callable[..., Any]) -> Callable[..., Any]:
    """One operation of the filesystem: under its lock (libfuse calls from several threads), and failing (``EIO``)
    once the power is cut."""

    @functools.wraps(method)
    def operation(self: PowerLossFS, *args: Any) -> Any:
        with self._mutex:
            if self.crashed:
                raise FuseOSError(errno.EIO)
            return method(self, *args)

    return operation


class PowerLossFS(Operations):  # type: ignore[misc]
    """The FUSE operations over ``backing``; see the module's docstring for the model."""

    def __init__(self, backing: str) -> None:
        self.backing = backing
        self.unsynced: dict[str, UnsyncedFile] = {}
        self.crashed = False
        self.full = False
        self.refused = 0
        """Operations refused (``ENOSPC``) while full."""
        self._mutex = threading.RLock()

    def crash(self) -> None:
        with self._mutex:
            self.crashed = True
            self.unsynced.clear()

    def fill(self, full: bool) -> int:
        """A full disk (``True``) or one with room; returns the operations refused since the disk last filled."""
        with self._mutex:
            if full and not self.full:
                self.refused = 0
            self.full = full
            return self.refused

    # -- the model

    def _grow(self, path: str, length: int) -> None:
        """Refuse (``ENOSPC``) to make the file longer than ``length`` while the disk is full."""
        if not self.full:
            return
        file = self.unsynced.get(path)
        if length > (file.size if file is not None else os.lstat(self._path(path)).st_size):
            self.refused += 1
            raise FuseOSError(errno.ENOSPC)

    def _path(self, path: str) -> str:
        return os.path.join(self.backing, path.lstrip("/"))

    def _synced_block(self, path: str, index: int, file: UnsyncedFile) -> bytearray:
        """Block ``index`` as the backing file holds it below ``file.floor``, zeros beyond."""
        start = index * BLOCK
        data = b""
        if start < file.floor:
            with open(self._path(path), "rb") as synced:
                synced.seek(start)
                data = synced.read(min(BLOCK, file.floor - start))
        return bytearray(data.ljust(BLOCK, b"\0"))

    def _unsynced(self, path: str) -> UnsyncedFile:
        file = self.unsynced.get(path)
        if file is None:
            file = self.unsynced[path] = UnsyncedFile(os.lstat(self._path(path)).st_size)
        return file

    def _block(self, path: str, file: UnsyncedFile, index: int) -> bytearray:
        block = file.blocks.get(index)
        if block is None:
            block = file.blocks[index] = self._synced_block(path, index, file)
        return block

    def _sync(self, path: str) -> None:
        file = self.unsynced.pop(path, None)
        if file is None:
            return
        fd = os.open(self._path(path), os.O_WRONLY)
        try:
            os.ftruncate(fd, file.floor)
            for index, block in sorted(file.blocks.items()):
                start = index * BLOCK
                if start < file.size:
                    os.pwrite(fd, bytes(block[: file.size - start]), start)
            os.ftruncate(fd, file.size)
        finally:
            os.close(fd)

    def _own(self, path: str) -> None:
        """A file or directory created through the mount belongs to its creator (this daemon runs as root)."""
        uid, gid, _ = fuse_get_context()
        os.lchown(self._path(path), uid, gid)

    # -- names and attributes: reach the backing directory at once

    @_operation
    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        st = os.lstat(self._path(path))
        attrs = {key: getattr(st, key) for key in ("st_atime", "st_ctime", "st_gid", "st_mode", "st_mtime")}
        attrs |= {"st_nlink": st.st_nlink, "st_uid": st.st_uid}
        file = self.unsynced.get(path)
        attrs["st_size"] = file.size if file is not None else st.st_size
        attrs["st_blocks"] = (attrs["st_size"] + 511) // 512
        return attrs

    @_operation
    def access(self, path: str, amode: int) -> None:
        if not os.access(self._path(path), amode):
            raise FuseOSError(errno.EACCES)

    @_operation
    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *os.listdir(self._path(path))]

    @_operation
    def readlink(self, path: str) -> str:
        return os.readlink(self._path(path))

    @_operation
    def statfs(self, path: str) -> dict[str, int]:
        st = os.statvfs(self._path(path))
        keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files", "f_flag", "f_frsize")
        return {key: getattr(st, key) for key in (*keys, "f_namemax")}

    @_operation
    def chmod(self, path: str, mode: int) -> None:
        os.chmod(self._path(path), mode)

    @_operation
    def chown(self, path: str, uid: int, gid: int) -> None:
        os.lchown(self._path(path), uid, gid)

    @_operation
    def utimens(self, path: str, times: tuple[float, float] | None = None) -> None:
        os.utime(self._path(path), times)

    @_operation
    def mkdir(self, path: str, mode: int) -> None:
        os.mkdir(self._path(path), mode)
        self._own(path)

    @_operation
    def rmdir(self, path: str) -> None:
        os.rmdir(self._path(path))

    @_operation
    def unlink(self, path: str) -> None:
        os.unlink(self._path(path))
        self.unsynced.pop(path, None)

    @_operation
    def rename(self, old: str, new: str) -> None:
        """The unsynced contents move with their names: the file's own, or every file's under a directory."""
        os.rename(self._path(old), self._path(new))
        for name in [name for name in self.unsynced if name == new or name.startswith(new + "/")]:
            del self.unsynced[name]
        for name in [name for name in self.unsynced if name == old or name.startswith(old + "/")]:
            self.unsynced[new + name[len(old) :]] = self.unsynced.pop(name)

    @_operation
    def symlink(self, target: str, source: str) -> None:
        os.symlink(source, self._path(target))

    # -- contents: kept here until synced

    @_operation
    def create(self, path: str, mode: int, flags: int = 0) -> int:
        os.close(os.open(self._path(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
        self._own(path)
        return 0

    @_operation
    def open(self, path: str, flags: int) -> int:
        # (O_TRUNC comes as a truncate of its own: libfuse 2 does not ask for atomic_o_trunc; and the kernel
        # follows every write through an O_SYNC or O_DSYNC descriptor with an fsync.)
        if not os.path.lexists(self._path(path)):
            raise FuseOSError(errno.ENOENT)
        return 0

    @_operation
    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        file = self.unsynced.get(path)
        if file is None:
            with open(self._path(path), "rb") as synced:
                synced.seek(offset)
                return synced.read(size)
        out = bytearray()
        position, end = offset, min(offset + size, file.size)
        while position < end:
            index, within = divmod(position, BLOCK)
            block = file.blocks.get(index) or self._synced_block(path, index, file)
            take = min(BLOCK - within, end - position)
            out += block[within : within + take]
            position += take
        return bytes(out)

    @_operation
    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        self._grow(path, offset + len(data))
        file = self._unsynced(path)
        position, done = offset, 0
        while done < len(data):
            index, within = divmod(position, BLOCK)
            take = min(BLOCK - within, len(data) - done)
            self._block(path, file, index)[within : within + take] = data[done : done + take]
            position += take
            done += take
        file.size = max(file.size, offset + len(data))
        return len(data)

    @_operation
    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        self._grow(path, length)
        file = self._unsynced(path)
        if length < file.size:
            index, within = divmod(length, BLOCK)
            if within:
                self._block(path, file, index)[within:] = bytes(BLOCK - within)
            for beyond in [beyond for beyond in file.blocks if beyond * BLOCK >= length]:
                del file.blocks[beyond]
            file.floor = min(file.floor, length)
        file.size = length

    @_operation
    def fsync(self, path: str, datasync: int, fh: int) -> int:
        self._sync(path)
        return 0

    @_operation
    def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
        return 0  # names are on the disk already

    def release(self, path: str, fh: int) -> int:
        return 0

    def flush(self, path: str, fh: int) -> int:
        return 0


def _serve_control(fs: PowerLossFS, control_path: str) -> None:
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    control.bind(control_path)
    control.listen(1)
    while True:
        conn, _ = control.accept()
        with conn:
            command = conn.recv(64).strip()
            if command == b"crash":
                fs.crash()
                conn.sendall(b"crashed\n")
            elif command in (b"full", b"room"):
                refused = fs.fill(command == b"full")
                conn.sendall(b"full\n" if command == b"full" else b"room %d\n" % refused)


def main() -> None:
    backing, mountpoint, control_path = sys.argv[1:4]
    fs = PowerLossFS(backing)
    threading.Thread(target=_serve_control, args=(fs, control_path), daemon=True).start()
    # big_writes: up to 128 KiB per write request, not 4 KiB (libfuse 2; libfuse 3 always does so)
    FUSE(fs, mountpoint, foreground=True, allow_other=True, big_writes=True)


if __name__ == "__main__":
    main()
