"""A filesystem that loses, on command, everything not yet synced to it: a power loss for the process above it.

Mounted (FUSE, :mod:`mfusepy`) over a backing directory, it passes every operation through, except that file
contents written since the file's last ``fsync``/``fdatasync`` (or a write through a descriptor opened ``O_SYNC`` or
``O_DSYNC``) are kept in this process's memory, not in the backing file, as a disk's volatile cache or the kernel's
dirty pages would be. Reads see them. ``crash`` (a line on the control socket) drops them all at once and fails every
later operation (``EIO``): what the backing directory holds then is what a disk would hold after a power cut, and a
PostgreSQL started on it must find every transaction it reported committed (``fsync = on``,
``synchronous_commit = on``), and may lose any other.

The model is a disk that keeps what was synced and loses every other content write. Metadata operations (create,
rename, unlink, mkdir, ownership) reach the backing directory at once, as a journalling filesystem's metadata
usually would; so the model is stricter than a real disk about contents, gentler about names (PostgreSQL syncs the
directories whose names it relies on anyway). A synced file goes to the backing file without the backing
filesystem's own ``fsync``: the backing directory is the model's disk, not the machine's.

Run as ``python -m tests.e2e.power_loss_fs BACKING MOUNTPOINT CONTROL_SOCKET`` (as root: the mount is shared with
other users, ``allow_other``, so PostgreSQL's OS user can use it); it serves until unmounted. The control socket
takes ``crash``, answered ``crashed``.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import threading
from typing import Any

from mfusepy import FUSE, FuseOSError, Operations, fuse_get_context

BLOCK = 8192
"""Unsynced contents are kept in blocks of this size (PostgreSQL's page)."""


class UnsyncedFile:
    """What was written to one file since its last sync: whole blocks, and its size as the writer sees it."""

    __slots__ = ("blocks", "size")

    def __init__(self, size: int) -> None:
        self.blocks: dict[int, bytearray] = {}
        self.size = size


class PowerLossFS(Operations):  # type: ignore[misc]
    """The FUSE operations; one lock orders them all (PostgreSQL's I/O in a test is small)."""

    def __init__(self, backing: str) -> None:
        self.backing = backing
        self.unsynced: dict[str, UnsyncedFile] = {}
        self.synced_writes: set[int] = set()
        """File handles opened ``O_SYNC``/``O_DSYNC``: each of their writes is synced as it returns."""
        self.crashed = False
        self._mutex = threading.RLock()
        self._next_fh = 1

    # -- the model

    def crash(self) -> None:
        with self._mutex:
            self.crashed = True
            self.unsynced.clear()

    def _path(self, path: str) -> str:
        return os.path.join(self.backing, path.lstrip("/"))

    def _alive(self) -> None:
        if self.crashed:
            raise FuseOSError(errno.EIO)

    def _synced_block(self, path: str, index: int, size: int) -> bytearray:
        """Block ``index`` as the backing file holds it, cut at ``size`` (the writer's size) and padded with zeros."""
        start = index * BLOCK
        data = b""
        if start < size:
            with open(self._path(path), "rb") as synced:
                synced.seek(start)
                data = synced.read(min(BLOCK, size - start))
        return bytearray(data.ljust(BLOCK, b"\0"))

    def _unsynced(self, path: str) -> UnsyncedFile:
        file = self.unsynced.get(path)
        if file is None:
            file = self.unsynced[path] = UnsyncedFile(os.lstat(self._path(path)).st_size)
        return file

    def _sync(self, path: str) -> None:
        file = self.unsynced.pop(path, None)
        if file is None:
            return
        fd = os.open(self._path(path), os.O_WRONLY)
        try:
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

    # -- metadata: reaches the backing directory at once

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        with self._mutex:
            st = os.lstat(self._path(path))
            attrs = {key: getattr(st, key) for key in ("st_atime", "st_ctime", "st_gid", "st_mode", "st_mtime")}
            attrs |= {"st_nlink": st.st_nlink, "st_uid": st.st_uid}
            file = self.unsynced.get(path)
            attrs["st_size"] = file.size if file is not None else st.st_size
            attrs["st_blocks"] = (attrs["st_size"] + 511) // 512
            return attrs

    def access(self, path: str, amode: int) -> None:
        if not os.access(self._path(path), amode):
            raise FuseOSError(errno.EACCES)

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *os.listdir(self._path(path))]

    def readlink(self, path: str) -> str:
        return os.readlink(self._path(path))

    def statfs(self, path: str) -> dict[str, int]:
        st = os.statvfs(self._path(path))
        keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files", "f_flag", "f_frsize")
        return {key: getattr(st, key) for key in (*keys, "f_namemax")}

    def chmod(self, path: str, mode: int) -> None:
        self._alive()
        os.chmod(self._path(path), mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        self._alive()
        os.lchown(self._path(path), uid, gid)

    def utimens(self, path: str, times: tuple[float, float] | None = None) -> None:
        self._alive()
        os.utime(self._path(path), times)

    def mkdir(self, path: str, mode: int) -> None:
        self._alive()
        os.mkdir(self._path(path), mode)
        self._own(path)

    def rmdir(self, path: str) -> None:
        self._alive()
        os.rmdir(self._path(path))

    def unlink(self, path: str) -> None:
        with self._mutex:
            self._alive()
            os.unlink(self._path(path))
            self.unsynced.pop(path, None)

    def rename(self, old: str, new: str) -> None:
        with self._mutex:
            self._alive()
            os.rename(self._path(old), self._path(new))
            file = self.unsynced.pop(old, None)
            self.unsynced.pop(new, None)
            if file is not None:
                self.unsynced[new] = file

    def link(self, target: str, source: str) -> None:
        self._alive()
        os.link(self._path(source), self._path(target))

    def symlink(self, target: str, source: str) -> None:
        self._alive()
        os.symlink(source, self._path(target))

    # -- contents: kept here until synced

    def _handle(self, flags: int) -> int:
        fh = self._next_fh
        self._next_fh += 1
        if flags & (os.O_SYNC | os.O_DSYNC):
            self.synced_writes.add(fh)
        return fh

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        with self._mutex:
            self._alive()
            os.close(os.open(self._path(path), os.O_WRONLY | os.O_CREAT, mode))
            self._own(path)
            return self._handle(0)

    def open(self, path: str, flags: int) -> int:
        with self._mutex:
            self._alive()
            if not os.path.lexists(self._path(path)):
                raise FuseOSError(errno.ENOENT)
            if flags & os.O_TRUNC:
                self.truncate(path, 0)
            return self._handle(flags)

    def release(self, path: str, fh: int) -> int:
        self.synced_writes.discard(fh)
        return 0

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        with self._mutex:
            self._alive()
            file = self.unsynced.get(path)
            if file is None:
                with open(self._path(path), "rb") as synced:
                    synced.seek(offset)
                    return synced.read(size)
            out = bytearray()
            position, end = offset, min(offset + size, file.size)
            while position < end:
                index, within = divmod(position, BLOCK)
                block = file.blocks.get(index) or self._synced_block(path, index, file.size)
                take = min(BLOCK - within, end - position)
                out += block[within : within + take]
                position += take
            return bytes(out)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        with self._mutex:
            self._alive()
            file = self._unsynced(path)
            position, done = offset, 0
            while done < len(data):
                index, within = divmod(position, BLOCK)
                block = file.blocks.get(index)
                if block is None:
                    block = file.blocks[index] = self._synced_block(path, index, file.size)
                take = min(BLOCK - within, len(data) - done)
                block[within : within + take] = data[done : done + take]
                position += take
                done += take
            file.size = max(file.size, offset + len(data))
            if fh in self.synced_writes:
                self._sync(path)
            return len(data)

    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        with self._mutex:
            self._alive()
            file = self._unsynced(path)
            if length < file.size:
                for index in [index for index in file.blocks if index * BLOCK >= length]:
                    del file.blocks[index]
                index, within = divmod(length, BLOCK)
                if within:
                    block = file.blocks.get(index) or self._synced_block(path, index, file.size)
                    block[within:] = bytes(BLOCK - within)
                    file.blocks[index] = block
            file.size = length

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        with self._mutex:
            self._alive()
            self._sync(path)
            return 0

    def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
        self._alive()
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
            if conn.recv(64).strip() == b"crash":
                fs.crash()
                conn.sendall(b"crashed\n")


def main() -> None:
    backing, mountpoint, control_path = sys.argv[1:4]
    fs = PowerLossFS(backing)
    threading.Thread(target=_serve_control, args=(fs, control_path), daemon=True).start()
    FUSE(fs, mountpoint, foreground=True, allow_other=True)


if __name__ == "__main__":
    main()
