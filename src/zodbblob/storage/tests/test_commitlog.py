"""The commit log's file format: records, torn writes, checkpoints, growth."""

import os
import shutil
import tempfile
import unittest
import zlib

from zodbblob.storage import commitlog
from zodbblob.storage.commitlog import ABORT
from zodbblob.storage.commitlog import COMMIT
from zodbblob.storage.commitlog import CommitLog
from zodbblob.storage.commitlog import CommitLogError
from zodbblob.storage.commitlog import Entry
from zodbblob.storage.commitlog import unfinished_records


def tid(number: int) -> bytes:
    return number.to_bytes(8, 'big')


def summary(log: CommitLog) -> list:
    return [(r.kind, r.sequence, r.tid, r.entries) for r in log.records]


class CommitLogTests(unittest.TestCase):

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='zodbblob-commitlog-')
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, 'commit.log')

    def open(self, **kw) -> CommitLog:
        log = CommitLog(self.path, **kw)
        self.addCleanup(log.close)
        return log

    def test_records_read_back_as_written(self):
        log = self.open()
        inline = (Entry(tid(1), 5, data=b'hello'),
                  Entry(tid(2), 0, data=b''))
        staged = (Entry(tid(3), 4096, staged='staged-1-0/7.blob'),)
        log.append(tid(10), inline)
        log.append(tid(11), staged)
        log.abort(tid(11))
        log.close()
        self.assertEqual(summary(self.open()), [
            (COMMIT, 1, tid(10), inline),
            (COMMIT, 2, tid(11), staged),
            (ABORT, 3, tid(11), ()),
        ])
        self.assertEqual(unfinished_records(self.path), 3)

    def test_a_torn_record_ends_the_log_and_is_written_over(self):
        log = self.open()
        for number in range(3):
            log.append(tid(number), (Entry(tid(1), 3, data=b'abc'),))
        log.close()
        third = commitlog.FIRST_RECORD + 2 * commitlog.PAGE
        with open(self.path, 'r+b') as f:
            f.seek(third + 40)  # inside the third record's entry
            f.write(b'X')
        log = self.open()
        self.assertEqual([r.tid for r in log.records], [tid(0), tid(1)])
        log.append(tid(7), ())
        log.close()
        self.assertEqual([(r.sequence, r.tid) for r in self.open().records],
                         [(1, tid(0)), (2, tid(1)), (3, tid(7))])

    def test_a_checkpoint_forgets_every_record_even_left_over_bytes(self):
        log = self.open()
        for number in range(3):
            log.append(tid(number), (Entry(tid(1), 3, data=b'abc'),))
        log.checkpoint()
        self.assertEqual((len(log), log.records), (0, []))
        log.append(tid(9), ())
        log.close()
        # The second and third records of the earlier lap are still in the
        # file, after the new first one; their sequence numbers are old.
        self.assertEqual(summary(self.open()), [(COMMIT, 4, tid(9), ())])

    def test_a_damaged_header_slot_falls_back_to_the_other(self):
        log = self.open()
        log.append(tid(1), ())
        log.checkpoint()           # generation 1, in the second slot
        log.append(tid(2), ())
        log.close()
        with open(self.path, 'r+b') as f:
            f.seek(commitlog.HEADER_SLOTS[1] + 10)
            f.write(b'XX')
        # Generation 0 expects sequence 1 at the first record, which now
        # holds sequence 2: no record is taken for one of its own.
        self.assertEqual(self.open().records, [])
        with open(self.path, 'r+b') as f:
            f.seek(commitlog.HEADER_SLOTS[0] + 10)
            f.write(b'XX')
        with self.assertRaises(CommitLogError) as raised:
            CommitLog(self.path)
        self.assertIn(self.path, str(raised.exception))

    def test_the_one_sync_mark_and_the_checkpointed_tid_are_kept(self):
        log = self.open()
        self.assertFalse(log.open_one_sync)   # a new log: nothing to doubt
        log.mark_open_one_sync(True)
        log.append(tid(5), ())
        log.checkpoint()
        log.append(tid(6), ())
        log.close()
        log = self.open()
        self.assertTrue(log.open_one_sync)    # kept by the checkpoint
        self.assertEqual(log.last_durable_tid, tid(6))
        log.checkpoint()
        log.close()
        log = self.open()
        self.assertEqual(log.records, [])
        self.assertEqual(log.last_durable_tid, tid(6))
        log.mark_open_one_sync(False)
        log.close()
        self.assertFalse(self.open().open_one_sync)

    def test_a_torn_close_mark_reads_as_still_open(self):
        log = self.open()
        log.mark_open_one_sync(True)
        log.mark_open_one_sync(False)   # the newer slot
        log.close()
        newer = commitlog.HEADER_SLOTS[0]   # generations 0, 1, 2: slot 0
        with open(self.path, 'r+b') as f:
            f.seek(newer + 20)
            f.write(b'torn')
        self.assertTrue(self.open().open_one_sync)

    def test_a_first_version_header_reads_as_closed(self):
        with open(self.path, 'wb') as f:
            f.write(b'\0' * commitlog.INITIAL_SIZE)
            header = commitlog._HEADER_V1.pack(b'ZBLOGHD1', 3, 1)
            f.seek(0)
            f.write(header + commitlog._CRC.pack(zlib.crc32(header)))
            f.seek(commitlog.FIRST_RECORD)
            f.write(commitlog.encode(COMMIT, 1, tid(4), ()))
        log = self.open()
        self.assertFalse(log.open_one_sync)
        self.assertEqual(log.last_durable_tid, tid(4))
        log.checkpoint()   # written in the new format from here on
        log.close()
        self.assertEqual(self.open().last_durable_tid, tid(4))

    def test_not_a_commit_log_is_refused_and_left_alone(self):
        with open(self.path, 'wb') as f:
            f.write(b'something else entirely' * 1000)
        with self.assertRaises(CommitLogError) as raised:
            CommitLog(self.path)
        self.assertIn(self.path, str(raised.exception))
        with open(self.path, 'rb') as f:
            self.assertEqual(f.read(), b'something else entirely' * 1000)

    def test_it_grows_with_zeros_up_to_its_maximum_then_needs_a_checkpoint(
            self):
        log = self.open()
        self.assertEqual(os.path.getsize(self.path), commitlog.INITIAL_SIZE)
        big = (Entry(tid(1), 300_000, data=b'y' * 300_000),)
        log.append(tid(1), big)
        size = os.path.getsize(self.path)
        self.assertGreater(size, commitlog.INITIAL_SIZE)
        # Grown with written zeros, not a hole.
        self.assertGreaterEqual(os.stat(self.path).st_blocks * 512, size)
        self.addCleanup(setattr, commitlog, 'MAXIMUM_SIZE',
                        commitlog.MAXIMUM_SIZE)
        commitlog.MAXIMUM_SIZE = size
        self.assertFalse(log.fits(big))
        with self.assertRaises(CommitLogError):
            log.append(tid(2), big)
        log.checkpoint()
        self.assertTrue(log.fits(big))
        log.append(tid(3), big)
        log.close()
        self.assertEqual([r.entries for r in self.open().records], [big])

    def test_one_record_larger_than_the_maximum_fits_an_empty_log(self):
        self.addCleanup(setattr, commitlog, 'MAXIMUM_SIZE',
                        commitlog.MAXIMUM_SIZE)
        commitlog.MAXIMUM_SIZE = commitlog.INITIAL_SIZE
        log = self.open()
        many = tuple(Entry(tid(n), 1, staged='staged-1-0/%d.blob' % n)
                     for n in range(20_000))
        self.assertTrue(log.fits(many))
        log.append(tid(1), many)
        self.assertFalse(log.fits(many))
        log.close()
        self.assertEqual(self.open().records[0].entries, many)

    def test_read_only_creates_nothing(self):
        with self.assertRaises(FileNotFoundError):
            CommitLog(self.path, read_only=True)
        self.assertEqual(os.listdir(self.dir), [])
        self.assertEqual(unfinished_records(self.path), 0)


def test_suite():
    return unittest.defaultTestLoader.loadTestsFromName(__name__)
