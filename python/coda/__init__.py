"""coda: the coda client library (libcoda) for Python, through ctypes.

Finds libcoda.so in this order: the CODA_LIB environment variable (a path),
a copy inside this package (coda/libcoda.so, bundled by `pip install` when
present), the crate's target/ directory when run from a source checkout,
else the system's loader path (libcoda.so.0 from `make install` + ldconfig,
or the Debian package). Turns
negative return codes into OSError(errno, message) and offers Client and
File objects that are context managers.

    import coda
    with coda.Client(servers="127.0.0.1:2432", cache_dir="/var/cache/coda",
                     secret_file="/etc/coda/admin.secret") as c:
        with c.open("/web/index.html") as f:
            print(f.read().decode())
"""

import ctypes
import ctypes.util
import errno as _errno
import os
from typing import Callable, List, Optional, Tuple, Union

PathLike = Union[str, bytes, "os.PathLike[str]"]

__all__ = ["Client", "File", "Error", "Event", "Conflict", "load_library", "version",
           "failover", "failback",
           "STATE_CONNECTED", "STATE_DISCONNECTED", "STATE_FAILED_OVER"]

STATE_CONNECTED = 1
STATE_DISCONNECTED = 2
STATE_FAILED_OVER = 3

TYPE_FILE, TYPE_DIR, TYPE_SYMLINK = 1, 2, 3
EVENT_NAMES = {1: "server_down", 2: "server_up", 3: "failover", 4: "failback",
               5: "callback_break", 6: "reintegrated", 7: "conflict",
               8: "reintegration_stalled", 9: "leader_changed",
               10: "member_down", 11: "member_up"}

# Library-specific codes (at or below -10000), see coda.h.
ECONFLICT = -10001
EPROTO = -10002
EPANIC = -10003


class StatT(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint64), ("mode", ctypes.c_uint32),
                ("nlink", ctypes.c_uint32), ("mtime_sec", ctypes.c_int64),
                ("mtime_nsec", ctypes.c_uint32), ("ino", ctypes.c_uint64),
                ("version", ctypes.c_uint64)]


class EventT(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_uint32), ("ino", ctypes.c_uint64),
                ("detail", ctypes.c_char * 256)]


class ConflictT(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint64), ("ino", ctypes.c_uint64),
                ("path", ctypes.c_char_p), ("op", ctypes.c_char_p),
                ("reason", ctypes.c_char_p), ("kind", ctypes.c_char_p),
                ("local_copy", ctypes.c_char_p), ("records", ctypes.c_uint32)]


class Conflict:
    """A reintegration conflict: .id (for resolve_conflict), .path, .op,
    .kind ("Conflict", "Exists", ...), .reason, .local_copy (a file with the
    local version, or None), .records."""

    def __init__(self, raw: "ConflictT") -> None:
        text = lambda b: b.decode("utf-8", "replace") if b is not None else None
        self.id = raw.id
        self.ino = raw.ino
        self.path = text(raw.path)
        self.op = text(raw.op)
        self.reason = text(raw.reason)
        self.kind = text(raw.kind)
        self.local_copy = text(raw.local_copy)
        self.records = raw.records

    def __repr__(self) -> str:
        return "Conflict(%d, %s %s: %s)" % (self.id, self.kind, self.path, self.reason)


KEEP_LOCAL, KEEP_SERVER = 1, 2


class Event:
    """One state change: .kind is a name ("failover", ...), .detail text."""

    def __init__(self, raw: EventT) -> None:
        self.kind = EVENT_NAMES.get(raw.kind, str(raw.kind))
        self.ino = raw.ino
        self.detail = raw.detail.decode("utf-8", "replace")

    def __repr__(self) -> str:
        return "Event(%s, %r)" % (self.kind, self.detail)


# Errors are raised as OSError(errno, detail, path): Python picks the matching
# subclass (FileNotFoundError, FileExistsError, ...). Library-specific codes
# keep their negative value as errno.
Error = OSError


READDIR_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32)
CONFLICT_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ConflictT))
ACL_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32,
                          ctypes.c_int)

_RIGHTS = "rlidwka"


def rights_string(bits: int) -> str:
    """Rights bits as Coda's letters in order ("rl"), or "none"."""
    s = "".join(c for i, c in enumerate(_RIGHTS) if bits & (1 << i))
    return s or "none"

_lib: Optional[ctypes.CDLL] = None


def _candidates(path: Optional[str]) -> List[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    found = [path, os.environ.get("CODA_LIB"),
             os.path.join(here, "libcoda.so.0"), os.path.join(here, "libcoda.so")]
    for profile in ("release", "debug"):
        found.append(os.path.join(here, "..", "..", "target", profile, "libcoda.so"))
    found += [ctypes.util.find_library("coda"), "libcoda.so.0"]
    return [c for c in found if c]


def load_library(path: Optional[str] = None) -> ctypes.CDLL:
    """Load libcoda once and declare every function this module uses.

    `path` (or CODA_LIB) names the library file; without them the package's
    own copy, a source checkout's target/ directory and the system's loader
    path are tried in that order. Raises OSError(ENOENT) naming CODA_LIB if
    none loads."""
    global _lib
    if _lib is not None:
        return _lib
    lib = None
    tried = []
    for c in _candidates(path):
        # A bare name ("libcoda.so.0") is for the loader's search path.
        if os.path.sep in c and not os.path.exists(c):
            continue
        try:
            lib = ctypes.CDLL(c)
            break
        except OSError as e:
            tried.append("%s: %s" % (c, e))
    if lib is None:
        raise OSError(_errno.ENOENT, "libcoda.so not found (set CODA_LIB to its path, "
                      "or install it: make install && ldconfig)" +
                      ("; tried " + "; ".join(tried) if tried else ""))
    P, S, I, U32, U64, I64, SZ = (ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int,
                                  ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int64,
                                  ctypes.c_size_t)
    PP = ctypes.POINTER(ctypes.c_void_p)
    sigs = {
        "coda_version": ([], S),
        "coda_strerror": ([I], S),
        "coda_last_error": ([ctypes.c_char_p, SZ], I),
        "coda_config_new": ([PP], I),
        "coda_config_set": ([P, S, S], I),
        "coda_config_free": ([P], None),
        "coda_client_new": ([P, PP], I),
        "coda_client_free": ([P], None),
        "coda_client_state": ([P], I),
        "coda_stat": ([P, S, ctypes.POINTER(StatT)], I),
        "coda_lstat": ([P, S, ctypes.POINTER(StatT)], I),
        "coda_readdir": ([P, S, READDIR_CB, P], I),
        "coda_mkdir": ([P, S, U32], I),
        "coda_rmdir": ([P, S], I),
        "coda_unlink": ([P, S], I),
        "coda_rename": ([P, S, S], I),
        "coda_symlink": ([P, S, S], I),
        "coda_readlink": ([P, S, ctypes.c_char_p, SZ], I),
        "coda_chmod": ([P, S, U32], I),
        "coda_truncate": ([P, S, U64], I),
        "coda_open": ([P, S, I, U32, PP], I),
        "coda_file_fd": ([P], I),
        "coda_read": ([P, P, SZ, U64], I64),
        "coda_write": ([P, P, SZ, U64], I64),
        "coda_close": ([P], I),
        "coda_failover": ([P, S, S], I),
        "coda_failback": ([P, S, S], I),
        "coda_event_next": ([P, ctypes.POINTER(EventT), I], I),
        "coda_conflicts_list": ([P, CONFLICT_CB, P], I),
        "coda_conflict_resolve": ([P, U64, I], I),
        "coda_reintegrate": ([P], I),
        "coda_pending_records": ([P], I64),
        "coda_acl_get": ([P, S, ACL_CB, P], I),
        "coda_acl_set": ([P, S, S, S], I),
        "coda_whoami": ([P, ctypes.c_char_p, SZ], I),
    }
    for name, (args, res) in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = res
    _lib = lib
    return lib


def _b(s: PathLike) -> bytes:
    if isinstance(s, bytes):
        return s
    return os.fsencode(s) if not isinstance(s, str) else s.encode("utf-8", "surrogateescape")


def _check(rc: int, what: PathLike = "") -> int:
    """Raise Error for a negative code, with the library's detail message."""
    if rc >= 0:
        return rc
    lib = load_library()
    buf = ctypes.create_string_buffer(1024)
    lib.coda_last_error(buf, len(buf))
    detail = buf.value.decode("utf-8", "replace") or lib.coda_strerror(rc).decode()
    code = -rc if rc > -10000 else rc
    raise OSError(code, detail, what or None)


def version() -> str:
    """The library's version string."""
    return load_library().coda_version().decode()


def failover(link: PathLike, target: PathLike, client: Optional["Client"] = None) -> None:
    """Repoint the symlink `link` to `target` atomically; with a client, also
    fail its remote operations with EIO until failback."""
    lib = load_library()
    h = client._h if client is not None else None
    _check(lib.coda_failover(h, _b(link), _b(target)), link)


def failback(link: PathLike, target: PathLike, client: Optional["Client"] = None) -> None:
    """Repoint the symlink `link` back to `target`; with a client, once a
    server answers again, and remote operations work again."""
    lib = load_library()
    h = client._h if client is not None else None
    _check(lib.coda_failback(h, _b(link), _b(target)), link)


class Client:
    """A connected client. Keyword arguments are configuration keys
    (servers, cache_dir, secret_file, cache_size, heartbeat_ms, ...)."""

    def __init__(self, **options: object) -> None:
        lib = load_library()
        self._lib = lib
        self._h = None
        cfg = ctypes.c_void_p()
        _check(lib.coda_config_new(ctypes.byref(cfg)))
        try:
            for k, v in options.items():
                _check(lib.coda_config_set(cfg, _b(k), _b(str(v))), k)
            h = ctypes.c_void_p()
            _check(lib.coda_client_new(cfg, ctypes.byref(h)))
            self._h = h
        finally:
            lib.coda_config_free(cfg)

    def close(self) -> None:
        """Disconnect and free the client (idempotent)."""
        if self._h is not None:
            self._lib.coda_client_free(self._h)
            self._h = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def _handle(self) -> ctypes.c_void_p:
        if self._h is None:
            raise ValueError("client is closed")
        return self._h

    def state(self) -> int:
        """STATE_CONNECTED, STATE_DISCONNECTED or STATE_FAILED_OVER."""
        return _check(self._lib.coda_client_state(self._handle()))

    def stat(self, path: PathLike, follow: bool = True) -> StatT:
        """Attributes of `path` (.size, .mode, .mtime_sec, ...); follow=False
        does not follow a final symlink."""
        st = StatT()
        fn = self._lib.coda_stat if follow else self._lib.coda_lstat
        _check(fn(self._handle(), _b(path), ctypes.byref(st)), path)
        return st

    def listdir(self, path: PathLike) -> List[str]:
        """The names in directory `path`, sorted."""
        names = []

        def cb(_ud: object, name: bytes, _type: int) -> int:
            names.append(name.decode("utf-8", "surrogateescape"))
            return 0

        _check(self._lib.coda_readdir(self._handle(), _b(path), READDIR_CB(cb), None), path)
        return sorted(names)

    def mkdir(self, path: PathLike, mode: int = 0o755) -> None:
        """Make directory `path`."""
        _check(self._lib.coda_mkdir(self._handle(), _b(path), mode), path)

    def rmdir(self, path: PathLike) -> None:
        """Remove the empty directory `path`."""
        _check(self._lib.coda_rmdir(self._handle(), _b(path)), path)

    def unlink(self, path: PathLike) -> None:
        """Remove the file or symlink `path`."""
        _check(self._lib.coda_unlink(self._handle(), _b(path)), path)

    def rename(self, src: PathLike, dst: PathLike) -> None:
        """Rename `src` to `dst` (replacing a file there)."""
        _check(self._lib.coda_rename(self._handle(), _b(src), _b(dst)), src)

    def symlink(self, target: PathLike, linkpath: PathLike) -> None:
        """Make `linkpath` a symlink to `target`."""
        _check(self._lib.coda_symlink(self._handle(), _b(target), _b(linkpath)), linkpath)

    def readlink(self, path: PathLike) -> str:
        """The target of symlink `path`."""
        buf = ctypes.create_string_buffer(4097)
        n = _check(self._lib.coda_readlink(self._handle(), _b(path), buf, len(buf)), path)
        return buf.raw[:n].decode("utf-8", "surrogateescape")

    def chmod(self, path: PathLike, mode: int) -> None:
        """Set the permission bits of `path`."""
        _check(self._lib.coda_chmod(self._handle(), _b(path), mode), path)

    def truncate(self, path: PathLike, size: int) -> None:
        """Cut or extend `path` to `size` bytes."""
        _check(self._lib.coda_truncate(self._handle(), _b(path), size), path)

    def open(self, path: PathLike, mode: str = "r", perm: int = 0o644) -> "File":
        """Open like the built-in open() but binary: "r", "w", "a", "x", "r+"."""
        flags = {"r": os.O_RDONLY, "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                 "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                 "x": os.O_WRONLY | os.O_CREAT | os.O_EXCL, "r+": os.O_RDWR}.get(
                     mode.replace("b", ""))
        if flags is None:
            raise ValueError("unsupported mode %r" % mode)
        h = ctypes.c_void_p()
        _check(self._lib.coda_open(self._handle(), _b(path), flags, perm, ctypes.byref(h)), path)
        return File(self, h, path, append="a" in mode)

    def read_file(self, path: PathLike) -> bytes:
        """The whole content of `path`."""
        with self.open(path) as f:
            return f.read()

    def write_file(self, path: PathLike, data: bytes) -> None:
        """Replace the content of `path` (created if missing) with `data`."""
        with self.open(path, "w") as f:
            f.write(data)

    def failover(self, link: PathLike, target: PathLike) -> None:
        """Module-level failover() for this client."""
        failover(link, target, self)

    def failback(self, link: PathLike, target: PathLike) -> None:
        """Module-level failback() for this client."""
        failback(link, target, self)

    def conflicts(self) -> List[Conflict]:
        """The unresolved reintegration conflicts, oldest first."""
        found = []

        def cb(_ud: object, c: "ctypes._Pointer[ConflictT]") -> int:
            found.append(Conflict(c.contents))
            return 0

        _check(self._lib.coda_conflicts_list(self._handle(), CONFLICT_CB(cb), None))
        return found

    def resolve_conflict(self, conflict_id: int, keep: str) -> None:
        """keep: "local" (send the local version again) or "server"."""
        k = {"local": KEEP_LOCAL, "server": KEEP_SERVER}.get(keep)
        if k is None:
            raise ValueError("keep must be 'local' or 'server'")
        _check(self._lib.coda_conflict_resolve(self._handle(), conflict_id, k))

    def reintegrate(self) -> None:
        """Send logged changes now (conflicts are set aside, see conflicts())."""
        _check(self._lib.coda_reintegrate(self._handle()))

    def pending_records(self) -> int:
        """How many changes are logged and not yet reintegrated."""
        return _check(self._lib.coda_pending_records(self._handle()))

    def get_acl(self, path: PathLike) -> Tuple[List[Tuple[str, str]], str]:
        """The access list of directory `path` as (name, rights) pairs, a
        negative entry's rights with a leading "-", and this user's own
        rights: ([("System:AnyUser", "rl"), ("bob", "-w")], "rlidwka")."""
        entries = []

        def cb(_ud: object, name: bytes, rights: int, negative: int) -> int:
            entries.append((name.decode("utf-8", "replace"),
                            ("-" if negative else "") + rights_string(rights)))
            return 0

        mine = _check(self._lib.coda_acl_get(self._handle(), _b(path), ACL_CB(cb), None), path)
        return entries, rights_string(mine)

    def set_acl(self, path: PathLike, name: str, rights: str) -> None:
        """Set `name`'s entry on directory `path`: "rl", "all", "-w"
        (negative), "none" / "-none" (remove)."""
        _check(self._lib.coda_acl_set(self._handle(), _b(path), _b(name), _b(rights)), path)

    def whoami(self) -> str:
        """The user this client authenticates as."""
        buf = ctypes.create_string_buffer(256)
        _check(self._lib.coda_whoami(self._handle(), buf, len(buf)))
        return buf.value.decode("utf-8", "replace")

    def next_event(self, timeout_ms: int = 0) -> Optional[Event]:
        """The next event, or None if none arrives within timeout_ms."""
        ev = EventT()
        rc = self._lib.coda_event_next(self._handle(), ctypes.byref(ev), int(timeout_ms))
        if rc == -_errno.EAGAIN:
            return None
        _check(rc)
        return Event(ev)


class File:
    """An open file with a position, like a binary file object."""

    def __init__(self, client: Client, handle: ctypes.c_void_p, path: PathLike,
                 append: bool = False) -> None:
        self._c = client
        self._h = handle
        self.name = path
        self._pos = 0
        self._append = append

    def fileno(self) -> int:
        """The cached container's file descriptor (valid until close)."""
        return _check(self._c._lib.coda_file_fd(self._h))

    def pread(self, size: int, offset: int) -> bytes:
        """Up to `size` bytes at `offset`, without moving the position."""
        buf = ctypes.create_string_buffer(size)
        n = _check(self._c._lib.coda_read(self._h, buf, size, offset), self.name)
        return buf.raw[:n]

    def read(self, size: Optional[int] = -1) -> bytes:
        """Up to `size` bytes from the position (all of the rest if < 0)."""
        if size is None or size < 0:
            chunks = []
            while True:
                b = self.pread(1 << 20, self._pos)
                if not b:
                    break
                chunks.append(b)
                self._pos += len(b)
            return b"".join(chunks)
        b = self.pread(size, self._pos)
        self._pos += len(b)
        return b

    def write(self, data: bytes) -> int:
        """Write `data` at the position; returns the count written."""
        data = _b(data)
        n = _check(self._c._lib.coda_write(self._h, data, len(data), self._pos), self.name)
        self._pos += n
        return n

    def seek(self, pos: int) -> None:
        """Move the position to `pos`."""
        self._pos = pos

    def close(self) -> None:
        """Store back if written; raises the store's error."""
        if self._h is not None:
            h, self._h = self._h, None
            _check(self._c._lib.coda_close(h), self.name)

    def __enter__(self) -> "File":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
