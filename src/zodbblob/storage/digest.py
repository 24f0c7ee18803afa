"""The content digest of a committed blob file.

One hash, named here and nowhere else: the catalog keeps each committed
file's digest (``blob.digest``), commit or the background scrubber
(``scrub.py``) computes it, and ``verify --checksum`` compares.  BLAKE3
with a 32-byte digest, from the ``blake3`` package (a dependency): on
this project's busy two-CPU machine it hashed a 10 MiB file in the page
cache at 2.9 GB/s on one thread (1 MiB reads), where hashlib's fastest
hash whose collisions nobody can construct, BLAKE2b, did 0.7 GB/s
(SHA-256 0.4).  Its own threads (``max_threads=AUTO``, 1.7-2.2 GB/s)
and ``update_mmap`` (2.1-2.5 GB/s) were slower there, and far slower at
100 KiB: the other core is busy.  A change of hash changes
`DIGEST_NAME` and `new_hash`; the catalog's digests then need a
migration (or a NULL, which the scrubber or the next ``verify
--record-checksums`` fills in).
"""

from __future__ import annotations

import os

import blake3

from zodbblob.layout import open_blob_file

DIGEST_NAME = 'BLAKE3-256'
DIGEST_SIZE = 32
# Files are read in chunks of this size: blake3 releases the GIL for
# large buffers, so a thread hashing a large file lets the committing
# thread (and the fdatasyncs) run meanwhile.
CHUNK = 1 << 20
# Threads that hash a large transaction's files with dedup on
# (``TransactionDigests``):
# two keep a second core busy where there is one; more would compete
# with the committing thread and the server's own.
HASHING_THREADS = max(1, min(2, os.cpu_count() or 1))


def new_hash():
    return blake3.blake3()


def digest_bytes(data: bytes) -> bytes:
    """The digest of `data`."""
    h = new_hash()
    h.update(data)
    return h.digest()


def digest_fd(fd: int) -> bytes:
    """The digest of what is left to read of the open file `fd`.

    Read into a buffer no larger than that (most blob files are a few
    KiB: a 1 MiB buffer zeroed for each made ``verify --checksum`` of
    100,000 small files about 1.5x slower).
    """
    h = new_hash()
    try:
        left = os.fstat(fd).st_size - os.lseek(fd, 0, os.SEEK_CUR)
    except OSError:
        left = CHUNK  # no position (a pipe): its size says nothing
    buffer = bytearray(max(1, min(CHUNK, left + 1)))
    view = memoryview(buffer)
    while True:
        n = os.readv(fd, [buffer])
        if not n:
            return h.digest()
        h.update(view[:n])


def digest_file(path: str) -> bytes:
    """The digest of the file at `path`; OSError if it cannot be read,
    NotABlobFile (an OSError) if it is no regular file: a FIFO under a
    blob name is never opened (recovery would wait on it for good), a
    symbolic link never followed."""
    fd = open_blob_file(path)
    try:
        return digest_fd(fd)
    finally:
        os.close(fd)


def has_digest(path: str, digest: bytes) -> bool:
    """Whether the file at `path` hashes to `digest` (a content
    downloaded from a bucket: ``Bucket.check_content``)."""
    return digest_file(path) == digest


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
    bytes its commit record holds anyway.  The files of a larger one are
    not hashed by the commit unless dedup is on (dedup needs their
    digests at publish): their rows get none, and the background
    scrubber (``scrub.py``) hashes them later, on a core nobody else
    wants.  With dedup on, they are hashed by `HASHING_THREADS` threads,
    started while the committing thread makes them durable (the
    fdatasyncs or syncfs wait on the disk, the hashing on the CPU, and
    the files are in the page cache), and ``tpc_finish`` waits for those
    threads (`result`) before it adds the rows.
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

    def result(self) -> dict[bytes, bytes | None]:
        """oid -> digest (None for a file that could not be read), once
        the hashing threads are done.

        Never raises: the transaction has committed, and a digest not
        recorded now is recorded by the scrubber, or by the next ``verify
        --record-checksums``.
        """
        for oids, future in self._hashing:
            try:
                self.known.update(zip(oids, future.result()))
            except Exception:
                pass
        self._hashing = []
        return self.known
