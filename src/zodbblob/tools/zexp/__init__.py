"""Export and import of ZEXP files, with their blobs, old files included.

The format is ZODB's (``Connection.exportFile``): ``ZEXP``, then one entry
per object, then 16 bytes of ``0xff``.  An entry is the object's oid (8
bytes), the length of its record (8 bytes, big-endian) and the record as
the storage holds it (two pickles: class, then state).  A blob's record is
followed by ``\\0BLOBSTART``, the size of its file (8 bytes) and the
file's bytes.  Files written by ours and by stock ZODB are the same, byte
for byte.

Files without the blob blocks exist: ZODB writes blob records without
them when its storage does not support blobs (a FileStorage opened
without its ``blob-dir``, a wrapper that hides ``IBlobStorage``), and
stock ZODB refuses to import them.  Here the blob's bytes come from a copy
of the old blob directory (`source_blob_dir`, any layout), found by the
oid the file gives; without one, the blob is imported empty and reported.

Importing reads the file twice.  The first pass checks all of it (every
length, every pickle, every class, every reference) and changes nothing,
so a truncated or corrupt file is refused with its byte offset before the
caller's transaction holds a single imported object.  The second pass
makes the objects: new ones, added to the caller's connection, whose
states are the file's with every reference turned to the new objects.
A ZEXP file is pickles: import only files you trust, as with ZODB.

The package: the format (`format`), `export_file` (`export`),
`import_file` (`importer`) and the blob directory an old file's blobs
come from (`source`).
"""

from zodbblob.tools.zexp.export import ExportReport, export_file
from zodbblob.tools.zexp.format import BLOB_MARKER, END_MARKER, MAGIC, ZexpError
from zodbblob.tools.zexp.importer import ImportReport, import_file
from zodbblob.tools.zexp.source import SourceBlobDirectory

__all__ = ['BLOB_MARKER', 'END_MARKER', 'MAGIC', 'ExportReport',
           'ImportReport', 'SourceBlobDirectory', 'ZexpError', 'export_file',
           'import_file']
