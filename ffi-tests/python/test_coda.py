"""Tests of the coda Python package (python/coda) against a real coda-server;
unittest style, run under pytest or unittest.

Run by `cargo test` (tests/ffi.rs), which starts the server and sets
CODA_LIB, CODA_TEST_SERVER, CODA_TEST_SECRET and CODA_TEST_DIR."""

import errno
import os
import unittest

import coda

_seq = [0]


def client():
    _seq[0] += 1
    return coda.Client(servers=os.environ["CODA_TEST_SERVER"],
                       secret_file=os.environ["CODA_TEST_SECRET"],
                       cache_dir=os.path.join(os.environ["CODA_TEST_DIR"],
                                              "cache-py-%d" % _seq[0]))


class ReadWrite(unittest.TestCase):
    def test_second_client_reads_what_the_first_wrote(self):
        with client() as a, client() as b:
            a.write_file("/py.txt", b"from python")
            self.assertEqual(b.read_file("/py.txt"), b"from python")
            a.write_file("/py.txt", b"changed")
            self.assertEqual(b.read_file("/py.txt"), b"changed")
            self.assertEqual(b.stat("/py.txt").size, 7)

    def test_append_and_fileno(self):
        with client() as c:
            c.write_file("/log", b"a")
            with c.open("/log", "a") as f:
                f.write(b"b")
            with c.open("/log") as f:
                self.assertEqual(os.pread(f.fileno(), 10, 0), b"ab")


class Directories(unittest.TestCase):
    def test_listdir_mkdir_rename_remove(self):
        with client() as c:
            c.mkdir("/pydir")
            c.write_file("/pydir/x", b"1")
            c.symlink("/pydir/x", "/pydir/l")
            self.assertEqual(c.listdir("/pydir"), ["l", "x"])
            self.assertEqual(c.readlink("/pydir/l"), "/pydir/x")
            c.rename("/pydir/x", "/pydir/y")
            self.assertEqual(c.listdir("/pydir"), ["l", "y"])
            c.unlink("/pydir/y")
            c.unlink("/pydir/l")
            c.rmdir("/pydir")
            self.assertNotIn("pydir", c.listdir("/"))


class AccessLists(unittest.TestCase):
    def test_whoami_get_and_set(self):
        with client() as c:
            self.assertEqual(c.whoami(), "admin")
            c.mkdir("/pyacl")
            entries, mine = c.get_acl("/pyacl")
            self.assertEqual(entries, [("System:Administrators", "rlidwka"),
                                       ("System:AnyUser", "rl")])
            self.assertEqual(mine, "rlidwka")
            c.set_acl("/pyacl", "System:AnyUser", "-w")
            c.set_acl("/pyacl", "System:AnyUser", "none")
            self.assertEqual(c.get_acl("/pyacl")[0],
                             [("System:Administrators", "rlidwka"), ("System:AnyUser", "-w")])
            with self.assertRaises(OSError) as e:
                c.set_acl("/pyacl", "nosuchuser", "rl")
            self.assertEqual(e.exception.errno, errno.ENOENT)
            with self.assertRaises(OSError) as e:
                c.set_acl("/pyacl", "admin", "rx")
            self.assertEqual(e.exception.errno, errno.EINVAL)
            c.write_file("/pyacl/f", b"x")
            with self.assertRaises(OSError) as e:
                c.get_acl("/pyacl/f")
            self.assertEqual(e.exception.errno, errno.ENOTDIR)


class Errors(unittest.TestCase):
    def test_errors_are_oserror_with_errno(self):
        with client() as c:
            with self.assertRaises(OSError) as cm:
                c.stat("/nope")
            self.assertEqual(cm.exception.errno, errno.ENOENT)
            self.assertIn("nope", cm.exception.strerror)
            c.mkdir("/edir")
            with self.assertRaises(OSError) as cm:
                c.mkdir("/edir")
            self.assertEqual(cm.exception.errno, errno.EEXIST)
            c.write_file("/edir/f", b"")
            with self.assertRaises(OSError) as cm:
                c.rmdir("/edir")
            self.assertEqual(cm.exception.errno, errno.ENOTEMPTY)
            with self.assertRaises(OSError) as cm:
                c.open("/edir/f", "x")
            self.assertEqual(cm.exception.errno, errno.EEXIST)

    def test_bad_config_key(self):
        with self.assertRaises(OSError) as cm:
            coda.Client(no_such_option="1")
        self.assertEqual(cm.exception.errno, errno.EINVAL)
        self.assertIn("no_such_option", cm.exception.strerror)


class Failover(unittest.TestCase):
    def test_failover_swaps_link_and_fails_remote_calls(self):
        d = os.environ["CODA_TEST_DIR"]
        link = os.path.join(d, "pyweb")
        os.symlink("remote", link)
        with client() as c:
            c.write_file("/page", b"remote")
            c.failover(link, "local")
            self.assertEqual(os.readlink(link), "local")
            self.assertEqual(c.state(), coda.STATE_FAILED_OVER)
            with self.assertRaises(OSError) as cm:
                c.read_file("/page")
            self.assertEqual(cm.exception.errno, errno.EIO)
            ev = c.next_event(1000)
            self.assertEqual(ev.kind, "failover")
            c.failback(link, "remote")
            self.assertEqual(os.readlink(link), "remote")
            self.assertEqual(c.read_file("/page"), b"remote")

    def test_failover_without_client_refuses_a_plain_file(self):
        d = os.environ["CODA_TEST_DIR"]
        p = os.path.join(d, "plain")
        with open(p, "w") as f:
            f.write("x")
        with self.assertRaises(OSError) as cm:
            coda.failover(p, "elsewhere")
        self.assertEqual(cm.exception.errno, errno.EINVAL)


class Conflicts(unittest.TestCase):
    def test_a_held_change_over_a_newer_server_version_is_a_conflict(self):
        _seq[0] += 1
        held = coda.Client(servers=os.environ["CODA_TEST_SERVER"],
                           secret_file=os.environ["CODA_TEST_SECRET"],
                           cache_dir=os.path.join(os.environ["CODA_TEST_DIR"],
                                                  "cache-py-%d" % _seq[0]),
                           write_disconnected="true", reintegration_age_ms=600000)
        with held, client() as other:
            other.write_file("/pyconflict", b"v1")
            self.assertEqual(held.read_file("/pyconflict"), b"v1")
            held.write_file("/pyconflict", b"held edit")
            self.assertEqual(held.pending_records(), 1)
            other.write_file("/pyconflict", b"server edit")
            held.reintegrate()
            self.assertEqual(held.pending_records(), 0)
            (c,) = held.conflicts()
            self.assertEqual(c.path, "/pyconflict")
            self.assertEqual(c.kind, "Conflict")
            with open(c.local_copy, "rb") as f:
                self.assertEqual(f.read(), b"held edit")
            with self.assertRaises(ValueError):
                held.resolve_conflict(c.id, "sideways")
            with self.assertRaises(OSError) as cm:
                held.resolve_conflict(c.id + 999, "server")
            self.assertEqual(cm.exception.errno, errno.ENOENT)
            held.resolve_conflict(c.id, "local")
            held.reintegrate()
            self.assertEqual(held.conflicts(), [])
            self.assertEqual(other.read_file("/pyconflict"), b"held edit")


if __name__ == "__main__":
    unittest.main()
