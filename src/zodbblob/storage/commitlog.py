"""The commit log: one durable write per blob transaction.

Before the base storage commits a transaction with blobs, one record
describing it is written to ``<blob_dir>/.zodbblob/commit.log`` and
fdatasynced: the transaction's tid and, for each blob, its oid and size,
and either the blob's bytes (*inline*, for transactions whose blobs are
small) or the name of its staged file (whose bytes and name were made
durable before the record).  With inline bytes, that one ``fdatasync`` is
the only sync the blob directory needs before the base commits: the blob
files and their names reach the disk later, at the next checkpoint, and
until then the log can rewrite them.

The file is zero-filled when it is created or grown and afterwards only
overwritten, so a record's ``fdatasync`` writes data and flushes the disk,
without a filesystem journal commit.  Records start on 4 KiB boundaries,
so writing one never rewrites a page of an earlier one.

A *checkpoint* (after the caller made every file named since the last one
durable) moves the log's start past every record: the next record is
written at the beginning again, with the next sequence number.  Two
header slots, written alternately, hold the sequence number the first
record after the checkpoint must have.  Reading stops at the first record
that is torn, has another sequence number (a leftover of an earlier lap)
or is not a record at all.

The header also says whether a storage committing with *one sync* (its
record's fdatasync overlapping the base's commit, ``commit.py``) has the
log open, and the tid of the last record a checkpoint let go.  Opening
such a storage writes a header marked open; closing it, after its last
checkpoint, one marked closed.  A torn header write is not read (its CRC
fails) and the other slot, one generation older, counts: a torn close
leaves the log looking open, which only makes the next open check the
base's last transaction (``filestorage.py``); a torn open happened before
any commit of that session, so the older header's "closed" is the truth.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from dataclasses import dataclass

from ZODB.utils import z64

from zodbblob.layout import check_id, fdatasync, fsync_directory
from zodbblob.storage.catalog import STATE_DIR

NAME = 'commit.log'
PAGE = 4096
HEADER_SLOTS = (0, PAGE)
FIRST_RECORD = 2 * PAGE
INITIAL_SIZE = 256 * 1024
MAXIMUM_SIZE = 16 * 1024 * 1024

# magic, generation, first sequence, last checkpointed tid, open flag
_HEADER = struct.Struct('>8sQQ8sB')
_HEADER_MAGIC = b'ZBLOGHD2'
# The first version's header: magic, generation, first sequence.  Only
# the serial commit protocol wrote it, which never leaves a transaction
# to roll back: it reads as closed.
_HEADER_V1 = struct.Struct('>8sQQ')
_HEADER_MAGIC_V1 = b'ZBLOGHD1'
_RECORD = struct.Struct('>4sBQQ8sI')    # magic, kind, sequence, length, tid,
_RECORD_MAGIC = b'ZBLR'                 # entries
_ENTRY = struct.Struct('>8sQBH')        # oid, size, flags, staged length
INLINE = 1         # flags: the entry's bytes follow
DIGEST = 2         # flags: its content digest follows (32 bytes)
DIGEST_SIZE = 32
_CRC = struct.Struct('>I')

COMMIT, ABORT = 1, 2


class CommitLogError(Exception):
    """The commit log cannot be used."""


@dataclass(frozen=True)
class Entry:
    """One blob of a logged transaction.

    `data` holds the bytes of an inline blob; `staged` (a path relative to
    the blob directory's ``tmp``) names a blob whose file was made durable
    before the record.  `digest` is its content's, where the record
    needs it (on a bucket with dedup: the content key it may create).
    """
    oid: bytes
    size: int
    data: bytes | None = None
    staged: str | None = None
    digest: bytes | None = None


@dataclass(frozen=True)
class Record:
    kind: int
    sequence: int
    tid: bytes
    entries: tuple[Entry, ...]


def _aligned(length: int) -> int:
    return (length + PAGE - 1) // PAGE * PAGE


def record_length(entries) -> int:
    """The length of a commit record of `entries`, before alignment."""
    return _RECORD.size + _CRC.size + sum(
        _ENTRY.size + len((entry.staged or '').encode('utf-8'))
        + (len(entry.data) if entry.data is not None else 0)
        + (DIGEST_SIZE if entry.digest is not None else 0)
        for entry in entries)


def encode(kind: int, sequence: int, tid: bytes, entries=()) -> bytes:
    parts = [b'']
    for entry in entries:
        staged = (entry.staged or '').encode('utf-8')
        flags = ((INLINE if entry.data is not None else 0)
                 | (DIGEST if entry.digest is not None else 0))
        parts.append(_ENTRY.pack(entry.oid, entry.size, flags, len(staged)))
        parts.append(staged)
        if entry.digest is not None:
            if len(entry.digest) != DIGEST_SIZE:
                raise ValueError(f'a digest of {len(entry.digest)} bytes')
            parts.append(entry.digest)
        if entry.data is not None:
            parts.append(entry.data)
    body = b''.join(parts)
    length = _RECORD.size + len(body) + _CRC.size
    head = _RECORD.pack(_RECORD_MAGIC, kind, sequence, length, tid,
                        len(entries))
    crc = zlib.crc32(body, zlib.crc32(head))
    return head + body + _CRC.pack(crc)


def _decode_entries(body: bytes, count: int) -> tuple[Entry, ...]:
    entries = []
    position = 0
    for _ in range(count):
        oid, size, flags, staged_length = _ENTRY.unpack_from(body, position)
        position += _ENTRY.size
        staged = body[position:position + staged_length].decode('utf-8')
        position += staged_length
        digest = None
        if flags & DIGEST:
            digest = body[position:position + DIGEST_SIZE]
            position += DIGEST_SIZE
        data = None
        if flags & INLINE:
            data = body[position:position + size]
            position += size
        entries.append(Entry(oid, size, data, staged or None, digest))
    if position != len(body):
        raise ValueError('entries do not fill the record')
    return tuple(entries)


class CommitLog:
    """The commit log of one blob directory, open for writing.

    Thread-safe; the storage serializes commits, and a checkpoint must not
    run while a logged transaction is still finishing (the storage waits
    for that).
    """

    def __init__(self, path: str, read_only: bool = False):
        self.path = path
        self._lock = threading.Lock()
        if not read_only and not os.path.exists(path):
            self._create(path)
        self._fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
        try:
            self._capacity = os.fstat(self._fd).st_size
            header = self._read_header()
            if header is None:
                raise CommitLogError(
                    'Commit log %s has no valid header (it is not a '
                    'zodbblob commit log, or was damaged)' % path)
            (self._generation, self._first_sequence, self._checkpointed_tid,
             self.open_one_sync) = header
            self.records = self._read_records()
        except BaseException:
            os.close(self._fd)
            raise
        last = self.records[-1] if self.records else None
        self._next_sequence = (last.sequence + 1 if last
                               else self._first_sequence)
        self._written_tid = self.last_durable_tid
        self._position = self._end_of_records

    @staticmethod
    def _create(path: str) -> None:
        temporary = path + '.new'
        fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _zero_fill(fd, 0, INITIAL_SIZE)
            # A new log is closed: nothing was committed through it.
            os.pwrite(fd, _header_bytes(0, 1, z64, False), HEADER_SLOTS[0])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temporary, path)
        fsync_directory(os.path.dirname(path))

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    # reading

    def _read_header(self) -> tuple[int, int, bytes, bool] | None:
        """(generation, first sequence, last checkpointed tid, open flag)
        of the newer valid header slot, or None."""
        best = None
        for offset in HEADER_SLOTS:
            raw = os.pread(self._fd, _HEADER.size + _CRC.size, offset)
            header = None
            for kind, magic in ((_HEADER, _HEADER_MAGIC),
                                (_HEADER_V1, _HEADER_MAGIC_V1)):
                if len(raw) < kind.size + _CRC.size:
                    continue
                (crc,) = _CRC.unpack_from(raw, kind.size)
                if (zlib.crc32(raw[:kind.size]) != crc
                        or raw[:len(magic)] != magic):
                    continue
                fields = kind.unpack_from(raw)
                if kind is _HEADER:
                    header = (fields[1], fields[2], fields[3],
                              fields[4] == 1)
                else:
                    header = (fields[1], fields[2], z64, False)
                break
            if header is not None and (best is None or header[0] > best[0]):
                best = header
        return best

    @property
    def last_durable_tid(self) -> bytes:
        """The tid of the last record known to be durable: the last one
        read or written, or the last one a checkpoint let go."""
        tids = [record.tid for record in self.records]
        return max([self._checkpointed_tid] + tids)

    def _read_records(self) -> list[Record]:
        records = []
        position = FIRST_RECORD
        expected = self._first_sequence
        while position + _RECORD.size <= self._capacity:
            head = os.pread(self._fd, _RECORD.size, position)
            magic, kind, sequence, length, tid, count = _RECORD.unpack(head)
            if (magic != _RECORD_MAGIC or sequence != expected
                    or kind not in (COMMIT, ABORT)
                    or length < _RECORD.size + _CRC.size
                    or position + length > self._capacity):
                break
            raw = os.pread(self._fd, length, position)
            (crc,) = _CRC.unpack_from(raw, length - _CRC.size)
            if zlib.crc32(raw[:-_CRC.size]) != crc:
                break  # torn: its fdatasync never returned
            try:
                entries = _decode_entries(raw[_RECORD.size:-_CRC.size],
                                          count)
            except (ValueError, struct.error, UnicodeDecodeError):
                break
            records.append(Record(kind, sequence, tid, entries))
            position += _aligned(length)
            expected += 1
        self._end_of_records = position
        return records

    # writing

    def __len__(self) -> int:
        """Records written since the last checkpoint."""
        return self._next_sequence - self._first_sequence

    def fits(self, entries) -> bool:
        """Whether a record of `entries` fits without a checkpoint.

        The log grows up to MAXIMUM_SIZE; a larger record fits only an
        empty log.
        """
        end = self._position + _aligned(record_length(entries))
        return (end <= max(self._capacity, MAXIMUM_SIZE)
                or self._position == FIRST_RECORD)

    def append(self, tid: bytes, entries, durable: bool = True) -> None:
        """Write the record of transaction `tid`; fdatasync it if `durable`.

        Raises CommitLogError when the log is full: checkpoint first
        (``fits`` tells).
        """
        self._write(COMMIT, tid, entries, durable)

    def sync(self) -> None:
        """Make every record written so far durable."""
        fdatasync(self._fd)

    def abort(self, tid: bytes) -> None:
        """Record that `tid`'s logged transaction aborted (not synced).

        Not needed for correctness (recovery asks the base storage), but it
        saves recovery the question.  The next durable record makes it
        durable too.
        """
        self._write(ABORT, tid, (), False)

    def _write(self, kind, tid, entries, durable) -> None:
        # struct's '8s' cuts or pads silently: a record of a 9-byte oid
        # would name another object, and recovery would act on that one.
        blob_dir = os.path.dirname(os.path.dirname(self.path))
        check_id(tid, 'tid', blob_dir)
        for entry in entries:
            check_id(entry.oid, 'oid', blob_dir)
        with self._lock:
            record = encode(kind, self._next_sequence, tid, entries)
            end = self._position + _aligned(len(record))
            if end > self._capacity:
                if (end > MAXIMUM_SIZE
                        and self._position > FIRST_RECORD):
                    raise CommitLogError(
                        'Commit log %s is full; a checkpoint must come first'
                        % self.path)
                self._grow(end)
            os.pwrite(self._fd, record, self._position)
            if durable:
                fdatasync(self._fd)
            self._position = end
            self._next_sequence += 1
            self._written_tid = max(self._written_tid, tid)

    def _grow(self, needed: int) -> None:
        capacity = self._capacity
        while capacity < needed:
            capacity *= 2
        _zero_fill(self._fd, self._capacity, capacity - self._capacity)
        os.fsync(self._fd)
        self._capacity = capacity

    def checkpoint(self) -> None:
        """Start the log afresh: every record so far is no longer needed.

        The caller has made every file and name the records describe
        durable, and the catalog rows too.
        """
        with self._lock:
            self._write_header(self._next_sequence, self._written_tid,
                               self.open_one_sync)
            self._first_sequence = self._next_sequence
            self._checkpointed_tid = self._written_tid
            self._position = FIRST_RECORD
            self.records = []

    def mark_open_one_sync(self, value: bool) -> None:
        """Record, durably, whether a one-sync storage has the log open.

        True at open, before the first commit; False at close, after the
        last checkpoint.  Only the newer header slot changes.
        """
        with self._lock:
            self._write_header(self._first_sequence, self._checkpointed_tid,
                               value)
            self.open_one_sync = value

    def _write_header(self, first_sequence: int, checkpointed_tid: bytes,
                      open_one_sync: bool) -> None:
        generation = self._generation + 1
        slot = HEADER_SLOTS[generation % len(HEADER_SLOTS)]
        os.pwrite(self._fd, _header_bytes(generation, first_sequence,
                                          checkpointed_tid, open_one_sync),
                  slot)
        fdatasync(self._fd)
        self._generation = generation


def latest_entries(records) -> dict[tuple[bytes, bytes], Entry | None]:
    """Each ``(oid, tid)`` the records name, with its entry: None where an
    abort record followed the commit record (its files must not stay)."""
    latest: dict[tuple[bytes, bytes], Entry | None] = {}
    for record in records:
        if record.kind == ABORT:
            for key in latest:
                if key[1] == record.tid:
                    latest[key] = None
            continue
        for entry in record.entries:
            latest[entry.oid, record.tid] = entry
    return latest


def commit_log_path(blob_dir: str) -> str:
    return os.path.join(blob_dir, STATE_DIR, NAME)


def unfinished_records(path: str) -> int:
    """How many records the commit log at `path` holds past its checkpoint.

    Zero for a blob directory its storage closed cleanly (or that has no
    log); read-only, for tools that must not touch an unrecovered
    directory.
    """
    if not os.path.exists(path):
        return 0
    log = CommitLog(path, read_only=True)
    try:
        return len(log.records)
    finally:
        log.close()


def _header_bytes(generation: int, first_sequence: int,
                  checkpointed_tid: bytes, open_one_sync: bool) -> bytes:
    header = _HEADER.pack(_HEADER_MAGIC, generation, first_sequence,
                          checkpointed_tid, 1 if open_one_sync else 0)
    return header + _CRC.pack(zlib.crc32(header))


def _zero_fill(fd: int, offset: int, length: int) -> None:
    # Real zeros, not a sparse hole or fallocate's unwritten extents: an
    # overwrite of written blocks changes no metadata, so the records'
    # fdatasync needs no filesystem journal commit.
    chunk = b'\0' * min(length, 1024 * 1024)
    end = offset + length
    while offset < end:
        offset += os.pwrite(fd, chunk[:end - offset], offset)

