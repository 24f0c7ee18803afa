"""The content digest of a committed blob file.

One hash, named here and nowhere else: the catalog keeps each committed
file's digest (``blob.digest``), commit computes it, and ``verify
--checksum`` compares.  BLAKE2b with a 32-byte digest, from hashlib: no
dependency, the fastest of hashlib's hashes whose collisions nobody can
construct (on this project's busy two-CPU machine: 720 MB/s, SHA-256
410 MB/s, SHA-512 240 MB/s, SHA3-256 160 MB/s).  BLAKE3 (a package,
not measured here) is the candidate for a later change, which changes
`DIGEST_NAME` and `new_hash`; the catalog's digests then need a
migration (or a NULL, which the next ``verify --record-checksums``
fills in).
"""

from __future__ import annotations

import hashlib
import logging
import os

logger = logging.getLogger(__name__)

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
    h = new_hash()
    h.update(data)
    return h.digest()


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


def digest_files(names: list[tuple[str, ...]]) -> list[bytes | None]:
    """The digest of each file of `names`, each given by its names (the
    first that can be read is hashed: a staged name may be gone, its
    final name not); None for one that cannot be read (a commit records
    no digest then, and verify fills it in)."""
    result = []
    for paths in names:
        digest = None
        for path in paths:
            try:
                digest = digest_file(path)
                break
            except OSError:
                pass
        result.append(digest)
    return result


class TransactionDigests:
    """The digests of the files of one transaction being committed.

    Where each is computed (``commit.py`` calls): a file whose content is
    a committed revision's (undo links it) takes that revision's digest
    from the catalog; an inline transaction's files are hashed from the
    bytes its commit record holds anyway; the files of a larger one are
    hashed by `HASHING_THREADS` threads, started while the committing
    thread makes them durable (the fdatasyncs or syncfs wait on the disk,
    the hashing on the CPU, and the files are in the page cache).

    The commit does not wait for those threads: its rows get the digests
    done by then (`ready`), and the threads record the rest in the
    catalog as they finish (`record_later`); a close waits for them.  A
    crash before they finish leaves rows without a digest, which
    ``verify --record-checksums`` fills in.  Hashing is CPU, and at
    10 MiB it is as long as stock's whole commit (14 ms at 720 MB/s,
    stock writes to the page cache): on a busy two-CPU machine the
    10 MiB rows of ``bench/commit.py`` ran at 0.2-0.4x stock, waiting or
    not (``doc/design.rst``).
    """

    def __init__(self):
        self.known: dict[bytes, bytes | None] = {}
        self._hashing: list = []   # (oids, future of their digests)

    def of_entries(self, entries) -> None:
        """Hash the bytes of commit log entries (an inline record's)."""
        for entry in entries:
            if self.known.get(entry.oid) is None:
                self.known[entry.oid] = digest_bytes(entry.data)

    def start(self, pool, files: list[tuple[bytes, tuple[str, ...]]]
              ) -> None:
        """Hash the files ``(oid, names)`` whose digest is not known, in
        `pool`: one task per thread, not per file (a task costs more than
        a small file)."""
        files = [(oid, names) for oid, names in files
                 if self.known.get(oid) is None]
        threads = HASHING_THREADS
        for part in range(min(threads, len(files))):
            chosen = files[part::threads]
            self._hashing.append((
                [oid for oid, names in chosen],
                pool.submit(digest_files, [names for oid, names in chosen])))

    def cancel(self) -> None:
        for oids, future in self._hashing:
            future.cancel()
        self._hashing = []

    def ready(self) -> dict[bytes, bytes | None]:
        """oid -> digest, of what is known now (None: not yet, or never).

        Never waits, never raises: the transaction has committed.
        """
        running = []
        for oids, future in self._hashing:
            if not future.done():
                running.append((oids, future))
            elif not future.cancelled() and future.exception() is None:
                self.known.update(zip(oids, future.result()))
        self._hashing = running
        return self.known

    def record_later(self, journal, tid: bytes) -> None:
        """Have the hashing still running record its digests in
        `journal` (the rows of `tid`, added already) when it is done."""
        for oids, future in self._hashing:
            future.add_done_callback(
                lambda future, oids=oids: _record(journal, tid, oids, future))
        self._hashing = []


def _record(journal, tid: bytes, oids: list[bytes], future) -> None:
    """In a hashing thread: record the digests it computed for rows that
    the commit added without them.  Never raises (nobody would see it)."""
    if future.cancelled() or future.exception() is not None:
        return
    rows = [(digest, oid, tid) for oid, digest in zip(oids, future.result())
            if digest is not None]
    if not rows:
        return
    try:
        journal.record_digests(rows)
    except Exception as e:
        logger.warning('Could not record the content digests of %d blob '
                       'files of transaction %s in %s (%s); verify '
                       '--record-checksums records them', len(rows),
                       tid.hex(), journal.path, e)
