"""The content digest of a committed blob file.

One hash, named here and nowhere else: the catalog keeps each committed
file's digest (``blob.digest``), commit computes it, and ``verify
--checksum`` compares.  BLAKE2b with a 32-byte digest, from hashlib: no
dependency, faster than SHA-256 without SHA extensions, and a hash whose
collisions nobody can construct.  A later change of hash changes
`DIGEST_NAME` and `new_hash`; the catalog's digests then need a
migration (or a NULL, which the next ``verify --checksum`` fills in).
"""

from __future__ import annotations

import hashlib
import os

DIGEST_NAME = 'BLAKE2b-256'
DIGEST_SIZE = 32
# Files are read in chunks of this size: hashlib releases the GIL for
# buffers over 2 KiB, so a thread hashing a large file lets the committing
# thread (and the fdatasyncs) run meanwhile.
CHUNK = 1 << 20
# Threads that hash a large transaction's files (``TransactionDigests``):
# two keep a second core busy where there is one; more would compete
# with the committing thread and the server's own.
HASHING_THREADS = max(1, min(2, os.cpu_count() or 1))


def new_hash():
    return hashlib.blake2b(digest_size=DIGEST_SIZE)


def digest_bytes(data: bytes) -> bytes:
    """The digest of `data`."""
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).digest()


def digest_fd(fd: int) -> bytes:
    """The digest of what is left to read of the open file `fd`."""
    h = new_hash()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    while True:
        n = os.readv(fd, [buffer])
        if not n:
            return h.digest()
        h.update(view[:n])


def digest_file(path: str) -> bytes:
    """The digest of the file at `path`; OSError if it cannot be read."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return digest_fd(fd)
    finally:
        os.close(fd)


def digest_files(paths: list[str]) -> list[bytes | None]:
    """The digest of each file of `paths`, None for one that cannot be
    read (a commit records no digest then, and verify fills it in)."""
    result = []
    for path in paths:
        try:
            result.append(digest_file(path))
        except OSError:
            result.append(None)
    return result


class TransactionDigests:
    """The digests of the files of one transaction being committed.

    Where each is computed (``commit.py`` calls): a file whose content is
    a committed revision's (undo links it) takes that revision's digest
    from the catalog; an inline transaction's files are hashed from the
    bytes its commit record holds anyway; the files of a larger one are
    hashed by `HASHING_THREADS` threads while the committing thread makes
    them durable (the fdatasyncs or syncfs wait on the disk, the hashing
    on the CPU, and the files are in the page cache), and `result` waits
    for them after the base has committed, before the catalog rows are
    added.
    """

    def __init__(self):
        self.known: dict[bytes, bytes | None] = {}
        self._hashing: list = []   # (oids, future of their digests)

    def of_entries(self, entries) -> None:
        """Hash the bytes of commit log entries (an inline record's)."""
        for entry in entries:
            if self.known.get(entry.oid) is None:
                self.known[entry.oid] = digest_bytes(entry.data)

    def start(self, pool, files: list[tuple[bytes, str]]) -> None:
        """Hash the files whose digest is not known, in `pool`: one task
        per thread, not per file (a task costs more than a small file)."""
        files = [(oid, path) for oid, path in files
                 if self.known.get(oid) is None]
        threads = HASHING_THREADS
        for part in range(min(threads, len(files))):
            chosen = files[part::threads]
            self._hashing.append((
                [oid for oid, path in chosen],
                pool.submit(digest_files, [path for oid, path in chosen])))

    def cancel(self) -> None:
        for oids, future in self._hashing:
            future.cancel()
        self._hashing = []

    def result(self) -> dict[bytes, bytes | None]:
        """oid -> digest (None where hashing failed), once all are done.

        Never raises: the transaction has committed, and a digest not
        recorded now is recorded by the next ``verify --checksum``.
        """
        for oids, future in self._hashing:
            try:
                self.known.update(zip(oids, future.result()))
            except Exception:
                pass
        self._hashing = []
        return self.known
