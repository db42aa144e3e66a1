"""Safe tar archives: the one way edgerun (and edgedistill, for data sets) opens an archive.

Every member is checked before anything is written: absolute paths, ``..`` components, symbolic and
hard links, device files and FIFOs are refused with the member's name, so a hostile archive cannot
write outside the target folder (CVE-2007-4559 and its kin).
"""
import os
import shutil
import tarfile
import tempfile

from .errors import UnsafeArchiveError


def check_member(member):
    """Raise UnsafeArchiveError unless ``member`` is a plain file or folder with a relative, inner path."""
    name = member.name
    normalized = name.replace("\\", "/")
    if normalized.startswith("/") or (len(normalized) > 1 and normalized[1] == ":"):
        raise UnsafeArchiveError("archive member '%s' has an absolute path; refusing to unpack" % name)
    parts = [p for p in normalized.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError("archive member '%s' climbs out with '..'; refusing to unpack" % name)
    if member.issym() or member.islnk():
        raise UnsafeArchiveError("archive member '%s' is a link (to '%s'); refusing to unpack"
                                 % (name, member.linkname))
    if not (member.isfile() or member.isdir()):
        raise UnsafeArchiveError("archive member '%s' is a device, FIFO or other special file; refusing to unpack"
                                 % name)


def safe_extract(archive_path, dest):
    """Unpack ``archive_path`` into ``dest`` after checking every member; returns ``dest``.

    The archive is unpacked into a temporary sibling folder that is renamed into place, so an
    interrupted unpack never leaves a half-filled ``dest``.
    """
    archive_path = str(archive_path)
    dest = os.path.abspath(str(dest))
    try:
        tar = tarfile.open(archive_path, "r:*")
    except (tarfile.TarError, OSError) as exc:
        raise UnsafeArchiveError("'%s' is not a readable tar archive: %s" % (archive_path, exc))
    parent = os.path.dirname(dest)
    if not os.path.isdir(parent):
        os.makedirs(parent)
    tmp = tempfile.mkdtemp(prefix=".unpack-", dir=parent)
    try:
        with tar:
            members = tar.getmembers()
            for member in members:
                check_member(member)
            for member in members:
                target = os.path.join(tmp, member.name)
                if member.isdir():
                    if not os.path.isdir(target):
                        os.makedirs(target)
                    continue
                folder = os.path.dirname(target)
                if not os.path.isdir(folder):
                    os.makedirs(folder)
                source = tar.extractfile(member)
                with source, open(target, "wb") as out:
                    shutil.copyfileobj(source, out)
        if os.path.exists(dest):
            shutil.rmtree(dest)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def pack_folder(folder, archive_path, arcname_root=""):
    """Write the plain files of ``folder`` (recursively, sorted, no links) into a gzip tar."""
    folder = str(folder)
    tmp = str(archive_path) + ".tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for root, dirs, files in os.walk(folder):
            dirs.sort()
            for name in sorted(files):
                path = os.path.join(root, name)
                if os.path.islink(path):
                    raise UnsafeArchiveError("'%s' is a symbolic link; a bundle holds plain files only" % path)
                rel = os.path.relpath(path, folder)
                tar.add(path, arcname=os.path.join(arcname_root, rel) if arcname_root else rel, recursive=False)
    os.replace(tmp, str(archive_path))
    return str(archive_path)
