"""Every location a user gives — a local path or a URI (`s3://`, `gs://`, anything
`pyarrow.fs.FileSystem.from_uri` resolves) — opened in one place, through pyarrow.fs.

`loc(x)` turns the string into a `Loc`: a filesystem, the path inside it, and the URI
that names it again (what a Ray task is handed: it resolves it on its own node, so no
stage depends on a disk shared between nodes). A Loc reads like pathlib for the few
operations the stages need. Writes of whole files are atomic: a local file is written
under a temporary name and renamed; an object store publishes an object only when its
upload completes, so a single PUT from memory is whole or absent.

Endpoints and credentials come from the standard places of each store (for S3: the
AWS_* environment variables, ~/.aws, instance roles; AWS_ENDPOINT_URL for an
S3-compatible server) or from the URI's query (`?endpoint_override=...&scheme=http`).
"""
from __future__ import annotations

import fnmatch
import json
import os
import threading
from pathlib import Path

from .config import UserError

_FS_CACHE: dict[str, object] = {}
_LOCK = threading.Lock()


def is_uri(x: str | os.PathLike) -> bool:
    return "://" in str(x)


def _filesystem(uri: str):
    """(filesystem, path) for a URI; one filesystem per scheme, bucket and query (an S3 client
    is not free to make, and a process resolves the same few locations many times)."""
    import pyarrow.fs as pafs

    scheme, rest = uri.split("://", 1)
    query = rest.split("?", 1)[1] if "?" in rest else ""
    key = f"{scheme}://{rest.split('/', 1)[0].split('?', 1)[0]}?{query}"
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as e:  # ArrowInvalid (a ValueError): unknown scheme or malformed URI
        raise UserError(f"cannot open {uri}: {str(e).splitlines()[0]} (give a local path or an s3://, gs:// or file:// URI)") from None
    with _LOCK:
        fs = _FS_CACHE.setdefault(key, fs)
    return fs, path


class Loc:
    """A file or folder in a pyarrow filesystem: `fs`, `path` inside it, `uri` for humans and tasks."""

    __slots__ = ("fs", "path", "scheme", "query")

    def __init__(self, fs, path: str, scheme: str = "", query: str = ""):
        self.fs, self.path, self.scheme, self.query = fs, path.rstrip("/") or "/", scheme, query

    # ------------------------------------------------------------ naming
    @property
    def uri(self) -> str:
        if not self.scheme:
            return self.path
        return f"{self.scheme}://{self.path}" + (f"?{self.query}" if self.query else "")

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"Loc({self.uri!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Loc) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    def __reduce__(self):  # a Ray task re-resolves the URI on its own node (its own credentials)
        return (loc, (self.uri,))

    def __truediv__(self, name: str) -> "Loc":
        return Loc(self.fs, f"{self.path}/{name}", self.scheme, self.query)

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def stem(self) -> str:
        return self.name.rsplit(".", 1)[0] if "." in self.name[1:] else self.name

    @property
    def parent(self) -> "Loc":
        return Loc(self.fs, self.path.rsplit("/", 1)[0] or "/", self.scheme, self.query)

    @property
    def is_local(self) -> bool:
        return not self.scheme

    def local_path(self) -> Path:
        if not self.is_local:
            raise ValueError(f"{self.uri} is not on the local disk")
        return Path(self.path)

    # ------------------------------------------------------------ questions
    def _info(self):
        try:
            return self.fs.get_file_info(self.path)
        except OSError as e:
            raise storage_error(self, e) from None

    def _type(self):
        """File, Directory or NotFound. In an object store a folder is a prefix that holds
        objects: an empty directory marker (pyarrow leaves one behind when it deletes the last
        object under a prefix) is not a folder."""
        import pyarrow.fs as pafs

        t = self._info().type
        if t == pafs.FileType.Directory and not self.is_local and not self.iterdir():
            return pafs.FileType.NotFound
        return t

    def exists(self) -> bool:
        import pyarrow.fs as pafs

        return self._type() != pafs.FileType.NotFound

    def is_file(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        import pyarrow.fs as pafs

        return self._type() == pafs.FileType.Directory

    def size(self) -> int:
        return int(self._info().size or 0)

    def iterdir(self) -> list["Loc"]:
        """Direct children, sorted by name; [] for a folder that does not exist."""
        import pyarrow.fs as pafs

        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        except OSError as e:
            raise storage_error(self, e) from None
        return sorted((Loc(self.fs, i.path, self.scheme, self.query) for i in infos
                       if i.path.rstrip("/") != self.path), key=lambda l: l.name)

    def glob(self, pattern: str) -> list["Loc"]:
        """Children whose name matches `pattern` (one level, fnmatch), sorted."""
        return [c for c in self.iterdir() if fnmatch.fnmatch(c.name, pattern)]

    # ------------------------------------------------------------ reading
    def read_bytes(self) -> bytes:
        try:
            with self.fs.open_input_stream(self.path) as f:
                return f.read()
        except OSError as e:
            raise storage_error(self, e) from None

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def read_json(self):
        return json.loads(self.read_text())

    def read_npy(self):
        """A .npy array, never unpickled."""
        import io

        import numpy as np

        return np.load(io.BytesIO(self.read_bytes()), allow_pickle=False)

    def open_input(self):
        """A seekable file for pyarrow.parquet and friends."""
        return self.fs.open_input_file(self.path)

    # ------------------------------------------------------------ writing
    def mkdir(self) -> None:
        if self.is_local:  # object stores have no folders: a prefix exists once an object is under it
            Path(self.path).mkdir(parents=True, exist_ok=True)

    def write_bytes(self, data: bytes) -> None:
        """Atomic: whole or absent (local: temporary name + rename; object store: one PUT)."""
        try:
            if self.is_local:
                p = Path(self.path)
                p.parent.mkdir(parents=True, exist_ok=True)
                tmp = p.parent / f".{p.name}.tmp-{os.getpid()}-{threading.get_ident()}"
                tmp.write_bytes(data)
                tmp.replace(p)
                return
            with self.fs.open_output_stream(self.path) as f:
                f.write(data)
        except OSError as e:
            raise storage_error(self, e) from None

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def write_json(self, obj, **kw) -> None:
        self.write_text(json.dumps(obj, indent=2, **kw))

    def write_npy(self, array) -> None:
        """One array as .npy (no pickled objects), atomically like write_bytes."""
        import io

        import numpy as np

        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        self.write_bytes(buf.getvalue())

    def unlink(self) -> None:
        if self.is_file():
            self.fs.delete_file(self.path)

    def rmtree(self) -> None:
        """The folder and everything under it (nothing when it is not there)."""
        import pyarrow.fs as pafs

        if self._info().type != pafs.FileType.Directory:
            return
        if not self.is_local:
            # Deepest folders first: an S3-compatible store that keeps folder entries (SeaweedFS)
            # removes an emptied folder only when the delete names it, so a bulk delete from the
            # top would leave empty folders behind that a listing still shows.
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True))
            for d in sorted((i.path for i in infos if i.type == pafs.FileType.Directory), key=lambda p: -p.count("/")):
                self.fs.delete_dir(d)
        self.fs.delete_dir(self.path)

    def move(self, dst: "Loc") -> None:
        """A file or folder to `dst`. Local: one rename (atomic). An object store cannot rename:
        each object is read and written again, then the source deleted (stages that publish a
        folder in an object store write it in place and mark it complete with a file instead)."""
        if self.is_local and dst.is_local:
            Path(self.path).replace(dst.path)
            return
        import pyarrow.fs as pafs

        files = [self] if self.is_file() else [
            Loc(self.fs, i.path, self.scheme, self.query)
            for i in self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True)) if i.type == pafs.FileType.File]
        for f in files:
            Loc(dst.fs, dst.path + f.path[len(self.path):], dst.scheme, dst.query).write_bytes(f.read_bytes())
        self.unlink() if self.is_file() else self.rmtree()


def loc(x: "str | os.PathLike | Loc") -> Loc:
    """The one way a stage opens a user's location. Local paths become absolute (Ray workers
    run in other folders); a URI keeps its scheme and query."""
    if isinstance(x, Loc):
        return x
    s = os.fspath(x)
    if not s:
        raise UserError("an empty path was given")
    import pyarrow.fs as pafs

    if not is_uri(s) or s.startswith("file://"):
        local = s[len("file://"):] if s.startswith("file://") else s
        return Loc(_local_fs(), str(Path(local).expanduser().absolute()), "", "")
    fs, path = _filesystem(s)
    query = s.split("?", 1)[1] if "?" in s else ""
    if isinstance(fs, pafs.LocalFileSystem):
        return Loc(fs, path, "", "")
    return Loc(fs, path, s.split("://", 1)[0], query)


def _local_fs():
    import pyarrow.fs as pafs

    with _LOCK:
        return _FS_CACHE.setdefault("local", pafs.LocalFileSystem())


def in_fs(fs, path: str, like: Loc) -> Loc:
    """A path Ray returned inside a filesystem (a checkpoint's, a run's) as a Loc, with the
    scheme and query of the location it came from."""
    return Loc(fs, path, like.scheme, like.query)


def storage_error(where: Loc, e: Exception) -> UserError:
    """One line naming the location and what the store said, without the SDK's request ids."""
    msg = str(e).splitlines()[0]
    for needle, say in (("NETWORK_CONNECTION", "the endpoint cannot be reached"),
                        ("ACCESS_DENIED", "access denied (check the credentials)"),
                        ("INVALID_ACCESS_KEY_ID", "access denied (unknown access key)"),
                        ("SIGNATURE_DOES_NOT_MATCH", "access denied (wrong secret key)"),
                        ("NO_SUCH_BUCKET", "the bucket does not exist")):
        if needle in msg:
            return UserError(f"{where.uri}: {say} ({msg.split(':', 1)[-1].strip()[:160]})")
    return UserError(f"{where.uri}: {msg[:300]}")


def check_access(where: Loc, write: bool = False) -> None:
    """The cheap question asked before Ray starts: can this store be reached with these
    credentials, and does the bucket exist? (A local path: always yes; its parents are made
    when written.) Raises a one-line UserError naming the location."""
    if where.is_local:
        return
    import pyarrow.fs as pafs

    bucket = where.path.split("/", 1)[0]
    try:
        info = where.fs.get_file_info(bucket)
        if info.type == pafs.FileType.NotFound:
            raise UserError(f"{where.uri}: the bucket '{bucket}' does not exist (create it first)")
        where.fs.get_file_info(where.path)  # access to the prefix itself (a HEAD and a LIST)
    except OSError as e:
        raise storage_error(where, e) from None


def write_parquet(table, where: Loc, **kw) -> None:
    """A Parquet file written whole or not at all (serialised in memory, then one atomic write).
    `table` is a pyarrow Table, or an iterable of Tables of one schema (one row group or more
    each): each is encoded on a writer thread while the iterable computes the next (pyarrow
    releases the GIL while it encodes), so producing and encoding overlap. An iterable that
    raises leaves nothing written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    if isinstance(table, pa.Table):
        pq.write_table(table, sink, **kw)
    else:
        from concurrent.futures import ThreadPoolExecutor

        writer = pending = None
        with ThreadPoolExecutor(1) as pool:
            try:
                for part in table:
                    if writer is None:
                        writer = pq.ParquetWriter(sink, part.schema, **kw)
                    if pending is not None:
                        pending.result()  # at most one chunk waiting: memory stays two chunks
                    pending = pool.submit(writer.write_table, part)
                if pending is not None:
                    pending.result()
            finally:  # the writer thread done with its chunk before the writer closes (else: a crash)
                if pending is not None:
                    pending.exception()  # waits; an error of its own was raised by result() above
                if writer is not None:
                    writer.close()
        if writer is None:
            raise ValueError("write_parquet: the iterable gave no table")
    where.write_bytes(sink.getvalue().to_pybytes())


def upload_dir(local: Path, dst: Loc) -> None:
    """Every file under a local folder to `dst` (same relative names); a local dst is a copy."""
    for p in sorted(Path(local).rglob("*")):
        if p.is_file():
            (dst / p.relative_to(local).as_posix()).write_bytes(p.read_bytes())
