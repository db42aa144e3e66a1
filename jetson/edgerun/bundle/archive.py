"""Safe tar archives: the one way edgerun (and edgedistill, for data sets) opens an archive.

Every member is checked before anything is written: absolute paths, ``..`` components, symbolic and hard links,
device files, FIFOs and sparse members are refused with the member's name, so a hostile archive cannot write outside
the target folder (CVE-2007-4559 and its kin) nor declare a small file that unpacks huge. What the members declare
is checked against the limits (total bytes, member count) and the free disk before the first byte is written, and
bytes are counted while writing, so a bomb stops at the cap. A truncated or damaged archive is an error that says so.

Bundles (:func:`unpack_private`) unpack into a folder created fresh for this process (mode 0700, a new name every
time, never an existing path), and each file's sha256 is taken from the bytes as they are written: the check and
the use are of the same bytes, and another process opening another bundle of the same file name cannot touch them.
"""

import atexit
import gzip
import hashlib
import os
import shutil
import tarfile
import tempfile
import zlib

from edgerun.errors import UnsafeArchiveError

CHUNK = 1 << 20
# A bundle holds a model, its INT8 variant, samples and a manifest: these caps leave room for a ResNet-152 teacher
# exported beside its student; --max-unpack-mb (or $EDGERUN_MAX_UNPACK_MB) raises them.
BUNDLE_MAX_MB = 1024
BUNDLE_MAX_MEMBERS = 256
MAX_UNPACK_ENV = "EDGERUN_MAX_UNPACK_MB"


def shown(name):
    """A member name safe to print on one line (newlines and other controls escaped)."""
    return name.encode("unicode_escape").decode("ascii")[:200]


class Limits(object):
    """Caps on what an archive may unpack: total bytes and member count (None: no cap)."""

    def __init__(self, max_bytes=None, max_members=None, flag="--max-unpack-mb"):
        self.max_bytes, self.max_members, self.flag = max_bytes, max_members, flag

    @classmethod
    def for_bundles(cls, max_mb=None, environ=None):
        environ = os.environ if environ is None else environ
        if max_mb is None and environ.get(MAX_UNPACK_ENV):
            try:
                max_mb = float(environ[MAX_UNPACK_ENV])
            except ValueError:
                raise UnsafeArchiveError(
                    "$%s must be a number of MB, not '%s'" % (MAX_UNPACK_ENV, environ[MAX_UNPACK_ENV])
                ) from None
        max_mb = BUNDLE_MAX_MB if max_mb is None else max_mb
        if not (0 < max_mb < float("inf")):  # nan fails both comparisons
            raise UnsafeArchiveError(
                "--max-unpack-mb (or $%s) must be a positive, finite number of MB, not %r" % (MAX_UNPACK_ENV, max_mb)
            )
        return cls(int(max_mb * (1 << 20)), BUNDLE_MAX_MEMBERS)


def check_member(member):
    """Raise UnsafeArchiveError unless ``member`` is a plain file or folder with a relative, inner path."""
    name = member.name
    normalized = name.replace("\\", "/")
    if normalized.startswith("/") or (len(normalized) > 1 and normalized[1] == ":"):
        raise UnsafeArchiveError("archive member '%s' has an absolute path; refusing to unpack" % shown(name))
    parts = [p for p in normalized.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError("archive member '%s' climbs out with '..'; refusing to unpack" % shown(name))
    if member.issym() or member.islnk():
        raise UnsafeArchiveError(
            "archive member '%s' is a link (to '%s'); refusing to unpack" % (shown(name), shown(member.linkname))
        )
    if member.issparse():
        raise UnsafeArchiveError(
            "archive member '%s' is a sparse file (it declares %d bytes); refusing to unpack: "
            "bundles and data sets hold plain files" % (shown(name), member.size)
        )
    if not (member.isfile() or member.isdir()):
        raise UnsafeArchiveError(
            "archive member '%s' is a device, FIFO or other special file; refusing to unpack" % shown(name)
        )


def _open(archive_path):
    try:
        return tarfile.open(str(archive_path), "r:*")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise UnsafeArchiveError(
            "'%s' is not a readable tar archive (%s): if it was copied, copy it again" % (archive_path, exc)
        ) from exc


def _members(tar, archive_path, limits, target):
    """Every member, checked, and the whole archive checked against ``limits`` and the free disk at ``target``."""
    try:
        members = tar.getmembers()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise UnsafeArchiveError("'%s' is truncated or damaged (%s): copy it again" % (archive_path, exc)) from exc
    for member in members:
        check_member(member)
    declared = sum(m.size for m in members if m.isfile())
    if limits.max_members is not None and len(members) > limits.max_members:
        raise UnsafeArchiveError(
            "'%s' holds %d members, over the cap of %d; refusing to unpack"
            % (archive_path, len(members), limits.max_members)
        )
    if limits.max_bytes is not None and declared > limits.max_bytes:
        raise UnsafeArchiveError(
            "'%s' declares %.0f MB of files, over the %.0f MB cap; refusing to unpack (raise it "
            "with %s if the bundle is genuinely that large)"
            % (archive_path, declared / 2.0**20, limits.max_bytes / 2.0**20, limits.flag)
        )
    free = shutil.disk_usage(target).free
    if declared > free:
        raise UnsafeArchiveError(
            "'%s' declares %.0f MB of files and '%s' has %.0f MB free; free some space first"
            % (archive_path, declared / 2.0**20, target, free / 2.0**20)
        )
    return members


def _write_members(tar, members, root, archive_path, limits):
    """Write ``members`` under ``root``; returns {name: sha256 of the bytes written}."""
    digests = {}
    written = 0
    for member in members:
        rel = "/".join(p for p in member.name.replace("\\", "/").split("/") if p not in ("", "."))
        target = os.path.join(root, *rel.split("/")) if rel else root
        try:
            if member.isdir():
                if not os.path.isdir(target):
                    os.makedirs(target)
                continue
            folder = os.path.dirname(target)
            if not os.path.isdir(folder):
                os.makedirs(folder)
            source = tar.extractfile(member)
            digest = hashlib.sha256()
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
            with source, os.fdopen(os.open(target, flags, 0o600), "wb") as out:
                while True:
                    block = source.read(CHUNK)
                    if not block:
                        break
                    written += len(block)
                    if limits.max_bytes is not None and written > limits.max_bytes:
                        raise UnsafeArchiveError(
                            "'%s' unpacks to more than the %.0f MB cap (at member '%s'); "
                            "stopped" % (archive_path, limits.max_bytes / 2.0**20, shown(member.name))
                        )
                    digest.update(block)
                    out.write(block)
            digests[rel] = digest.hexdigest()
        except UnsafeArchiveError:
            raise
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            raise UnsafeArchiveError(
                "'%s' is truncated or damaged at member '%s' (%s): copy it again"
                % (archive_path, shown(member.name), exc)
            ) from exc
        except OSError as exc:
            raise UnsafeArchiveError(
                "cannot unpack member '%s' of '%s' (%s): two members clash (a file and a folder "
                "of one name), a name is too long, or the disk is full"
                % (shown(member.name), archive_path, exc.strerror or exc)
            ) from exc
    return digests


def safe_extract(archive_path, dest, limits=None):
    """Unpack ``archive_path`` into ``dest`` after checking every member; returns ``dest``.

    The archive is unpacked into a temporary sibling folder that is renamed into place, so an interrupted unpack
    never leaves a half-filled ``dest``. ``dest`` itself must not be a symbolic link.
    """
    archive_path = str(archive_path)
    dest = os.path.abspath(str(dest))
    limits = limits or Limits()
    if os.path.islink(dest):
        raise UnsafeArchiveError("'%s' is a symbolic link; refusing to unpack over it" % dest)
    tar = _open(archive_path)
    parent = os.path.dirname(dest)
    if not os.path.isdir(parent):
        os.makedirs(parent)
    tmp = tempfile.mkdtemp(prefix=".unpack-", dir=parent)
    try:
        with tar:
            members = _members(tar, archive_path, limits, parent)
            _write_members(tar, members, tmp, archive_path, limits)
        if os.path.isdir(dest) and not os.path.islink(dest):
            shutil.rmtree(dest)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def unpack_private(archive_path, workdir=None, limits=None):
    """Unpack a bundle archive into a new folder private to this process; returns (folder, {name: sha256}).

    The folder (mode 0700, a fresh name under ``workdir`` or the system's temporary folder) is removed when the
    unpack fails, and at this process's exit."""
    limits = limits or Limits.for_bundles()
    stem = os.path.basename(str(archive_path))
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)[:40]
    if workdir is not None and not os.path.isdir(str(workdir)):
        os.makedirs(str(workdir))
    folder = tempfile.mkdtemp(prefix="edgerun-%s-" % stem, dir=None if workdir is None else str(workdir))
    atexit.register(shutil.rmtree, folder, True)
    try:
        tar = _open(archive_path)
        with tar:
            members = _members(tar, archive_path, limits, folder)
            digests = _write_members(tar, members, folder, archive_path, limits)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder, digests


PACK_MTIME = 315532800  # 1980-01-01, as wheels and reproducible builds use: the same folder packs to the same bytes


def pack_folder(folder, archive_path, arcname_root=""):
    """Write the plain files of ``folder`` (recursively, sorted, no links) into a gzip tar, reproducibly: fixed
    times, owners and modes, so the same files always pack to the same bytes (deploy compares them by sha256)."""
    folder = str(folder)
    tmp = str(archive_path) + ".tmp"
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=PACK_MTIME) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for root, dirs, files in os.walk(folder):
                dirs.sort()
                for name in sorted(files):
                    path = os.path.join(root, name)
                    if os.path.islink(path):
                        raise UnsafeArchiveError("'%s' is a symbolic link; a bundle holds plain files only" % path)
                    rel = os.path.relpath(path, folder)
                    info = tar.gettarinfo(path, arcname=os.path.join(arcname_root, rel) if arcname_root else rel)
                    info.mtime, info.uid, info.gid, info.uname, info.gname = PACK_MTIME, 0, 0, "", ""
                    info.mode = 0o644
                    with open(path, "rb") as handle:
                        tar.addfile(info, handle)
    os.replace(tmp, str(archive_path))
    return str(archive_path)
