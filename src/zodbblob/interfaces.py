"""The contracts of zodbblob's parts, written down before the classes."""

from transaction.interfaces import ISavepointDataManager
from zope.interface import Attribute
from zope.interface import Interface


class ILayout(Interface):
    """Maps an oid to where its blob files live below a blob directory.

    All paths are relative to the blob directory and use ``os.sep``.
    """

    name = Attribute("The name written into the ``.layout`` marker.")

    directory_per_oid = Attribute(
        "True when every oid has a directory of its own (bushy, lawn); "
        "False when the files of many oids share a directory "
        "(chunky, flat).")

    def oid_to_path(oid):
        """The path that names `oid` (8 bytes).

        Raises ``zodbblob.layout.InvalidIdError`` (a ValueError) for an
        oid that is not 8 bytes: ``oid_repr`` of one may hold ``/..``.

        For a layout with a directory per oid this is that directory; for
        one without, it is the directory plus the file name prefix that
        every revision of the oid shares.
        """

    def path_to_oid(path):
        """The oid that `path` (as returned by `oid_to_path`) names.

        Raises ``ValueError('Not a valid OID path: `PATH`')`` for a path
        that names no oid.
        """

    def oid_directory(oid):
        """The directory that holds the blob files of `oid`."""

    def getBlobFilePath(oid, tid):
        """The path of the committed blob file of revision `tid` of `oid`.

        Raises ``zodbblob.layout.InvalidIdError`` when either is not 8
        bytes.
        """

    def blob_path_to_oid_tid(path):
        """``(oid, tid)`` for a path returned by `getBlobFilePath`.

        Raises ValueError, naming the path, for any other path.
        """

    def iter_blob_paths(base_dir):
        """Yield ``(oid, tid, path)`` for every blob file below `base_dir`.

        `path` is absolute.  Files and directories that are not blob files
        of this layout (``tmp``, markers, hidden names) are passed over.
        """


class IBlobJournal(Interface):
    """The catalog of a blob directory's committed files.

    It knows every committed blob file (oid, tid, size), so that nothing
    on a hot path has to walk the blob directory.  What a transaction is
    about to publish is in the commit log (``zodbblob.storage.commitlog``), not
    here: rows are added once the base storage has committed.
    """

    def add(rows):
        """Record committed files ``(oid, tid, size, digest)``, or
        ``(oid, tid, size)`` where the content digest is not known (it is
        then NULL); existing rows stay.

        Each row supersedes the oid's row before it (its ``superseded``
        becomes `tid`); a row whose size is None records a revision that
        is no blob file, and only supersedes.

        Not synced: the caller keeps the commit log's record until
        ``sync`` has made the rows durable.  Never raises for the
        database (the transaction has committed): rows that cannot be
        written stay pending, and ``sync`` raises until they are written.
        """

    def check():
        """What is wrong with the database file, or None if it is sound."""

    def known(pairs):
        """The ``(oid, tid)`` of `pairs` that the catalog has."""

    def sync():
        """Make every row added so far durable."""

    def total_size():
        """The bytes of all committed blob files, in O(1)."""

    def revisions(oid):
        """The tids of the committed blob files of `oid`, ascending."""

    def rows(stop=None, digests=False):
        """Batches of ``(oid, tid, size)`` in ``(oid, tid)`` order, each
        read on its own (memory that does not grow with the catalog);
        with `stop`, without the rows superseded at or before it; with
        `digests`, ``(oid, tid, size, digest)``."""

    def digest(oid, tid):
        """The content digest recorded for revision `tid` of `oid`
        (``zodbblob.storage.digest``), or None if not known."""

    def record_digests(rows):
        """Record ``(digest, oid, tid)`` for rows that have no digest
        yet; the count recorded."""

    def same_content(keys, limit):
        """``{(digest, size): [(oid, tid), ...]}``: up to `limit` of the
        committed rows of each ``(digest, size)`` in `keys`, latest first
        (the files a commit with dedup on may link to), however many
        rows a content has."""

    def superseded(stop):
        """Batches of the ``(oid, tid)`` superseded at or before tid
        `stop`, from an index: the revisions a pack to `stop` may drop."""

    def remove(pairs):
        """Forget the committed files ``(oid, tid)`` in `pairs`; the oids
        among them that have no committed file left."""

    def begin_pack(packtime):
        """Durably record that a pack starts, before the base packs."""

    def pack_started():
        """The pack time of a pack that did not finish, or None."""

    def end_pack():
        """The pack has removed its files: forget its intent."""


class IBlobDataManager(ISavepointDataManager):
    """Owns one transaction's temporary directory and blob savepoints.

    Joined to a transaction by the storage's ``temporaryDirectory()`` when
    that transaction first needs a file.  Savepoints keep every
    savepoint's blob files (hard links, no copies); rollback puts them
    back; the end of the transaction, commit or abort, removes what it
    kept and its directory.
    """

    directory = Attribute("The transaction's temporary directory.")

    def event():
        """The transaction asked for its directory again (a new file).

        Takes the state of a savepoint whose state is still pending.
        """


class IBlobCache(Interface):
    """A ZEO client's blob cache: files, their index, and downloads.

    The files are laid out as stock ZEO lays out its cache (``zeocache``:
    ``<oid % 997>/<oid // 997>.<tid hex>.blob``), so an existing stock
    cache directory is adopted as it is.  The index (SQLite, WAL mode, in
    the cache directory) knows every file's oid, tid, size, last access and
    state, so no operation walks the directory.  Several threads and
    several processes on one host may use one cache directory at once.
    """

    directory = Attribute("The cache directory (absolute).")
    size_limit = Attribute(
        "Bytes above which the cache evicts (None: never evicts).")
    check_percent = Attribute(
        "Eviction goes down to size_limit minus this percent of it.")

    def path(oid, tid):
        """Where the complete file of ``(oid, tid)`` is (or would be)."""

    def lookup(oid, tid, counted=True):
        """The path of a complete cached file of ``(oid, tid)``, or None.

        A hit records the access (batched, in memory: no synchronous
        write per read) and, if `counted`, counts a hit; a miss, if
        `counted`, counts a miss.  A file removed by hand, or one
        whose size is not the indexed size, is a miss (and is forgotten).
        """

    def load(oid, tid, fetch, counted=True):
        """The path of ``(oid, tid)``, downloading it at most once.

        Its lookup counts a hit or a miss if `counted` (a caller that
        looks one read up twice counts it once).

        A hit returns at once.  On a miss, exactly one caller among all
        threads and processes sharing the directory claims the download
        (``begin``): it calls ``fetch(temp_path)``, which must write the
        complete blob to the fresh file ``temp_path``; the file then gets
        its name atomically (``complete``), or, if `fetch` raises, the
        claim is dropped (``cancel``) and the exception propagates.  Every
        other caller waits for that download; if its owner died or its
        claim is older than the timeout, one waiter takes it over with a
        fresh file.  A partial file is never appended to or served.
        May evict other files afterwards, to get under the size limit.
        """

    def admit(oid, tid, filename):
        """Take `filename`, a blob this client committed, into the cache.

        The file is moved (renamed; linked or copied across filesystems)
        to its cache name and indexed as complete.  Returns the path.
        """

    def prune(size_limit=None, keep=None):
        """Evict least recently accessed files down to the low-water mark.

        Files being downloaded, and the file ``keep`` (an ``(oid, tid)``
        being read), are never evicted; files admitted or accessed in the
        last few seconds go last, only if the others are not enough.
        Returns ``(files, bytes)`` removed.  If the cache cannot get
        under the limit (``keep`` larger than it, files that could not
        be removed), it logs that once at WARNING and returns.
        """

    def stats():
        """A dict: files, bytes, oldest_access, hits, misses."""

    def flush():
        """Write the batched accesses and hit counts to the index."""

    def close():
        """Flush and close the index."""
