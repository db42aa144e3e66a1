"""Where deployed bundles live on a board: one versioned folder per release, one ``current`` link per model.

    ROOT/models/<name>/<version>/bundle.edb     a release (version: the first 16 hex digits of its manifest sha256)
    ROOT/models/<name>/<version>/...            its engine, the engine's record, its results
    ROOT/models/<name>/current -> <version>     what the line runs (a service reads current/bundle.edb)
    ROOT/models/<name>/previous -> <version>    the release before it, kept for `rollback`

A link is switched by writing a new link beside it and renaming it over the old one: a reader sees the old
release or the new one, never none. ``edgedistill deploy`` drives these through ``edgerun slot``.
"""

import os
import re

from edgerun.errors import EdgerunError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
VERSION = re.compile(r"^[0-9a-f]{16}$")
BUNDLE_FILE = "bundle.edb"


class SlotError(EdgerunError):
    """A release folder or link that cannot be used as asked."""


def _check(name, version=None):
    if not NAME.match(name or ""):
        raise SlotError("model name '%s' cannot name a folder (letters, digits, '.', '_', '-'; 128 at most)" % name)
    if version is not None and not VERSION.match(version or ""):
        raise SlotError("release '%s' is not a version (16 lowercase hex digits of the manifest's sha256)" % version)


def model_dir(root, name):
    _check(name)
    return os.path.join(root, "models", name)


def release_dir(root, name, version):
    _check(name, version)
    return os.path.join(model_dir(root, name), version)


def _link_target(path):
    return os.readlink(path) if os.path.islink(path) else None


def _set_link(path, target):
    """Point ``path`` at ``target`` (a sibling folder's name) atomically. A real file or folder in the link's place
    is refused, never replaced: it is someone's, and rename cannot put a link over a folder."""
    if os.path.lexists(path) and not os.path.islink(path):
        raise SlotError(
            "'%s' is a real %s, not a link: edgerun keeps each release in its version folder and '%s' as a link to "
            "one. Move it aside (sudo mv %s %s.old) and run the command again"
            % (path, "folder" if os.path.isdir(path) else "file", os.path.basename(path), path, path)
        )
    tmp = "%s.tmp-%d" % (path, os.getpid())
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, path)


def activate(root, name, version):
    """Make ``version`` the current release of ``name``; the one it replaces becomes ``previous``. Returns
    {'current': version, 'previous': ...}."""
    folder = release_dir(root, name, version)
    if not os.path.isfile(os.path.join(folder, BUNDLE_FILE)):
        raise SlotError("release %s of '%s' has no %s in %s: copy it first" % (version, name, BUNDLE_FILE, folder))
    base = model_dir(root, name)
    old = _link_target(os.path.join(base, "current"))
    if old and old != version:
        _set_link(os.path.join(base, "previous"), old)
    _set_link(os.path.join(base, "current"), version)
    return {"current": version, "previous": _link_target(os.path.join(base, "previous"))}


def rollback(root, name):
    """Switch ``name`` back to its previous release (and the current one becomes previous)."""
    base = model_dir(root, name)
    current, previous = _link_target(os.path.join(base, "current")), _link_target(os.path.join(base, "previous"))
    if not previous:
        raise SlotError("model '%s' has no previous release under %s to roll back to" % (name, base))
    if not os.path.isfile(os.path.join(base, previous, BUNDLE_FILE)):
        raise SlotError("the previous release %s of '%s' is gone from %s" % (previous, name, base))
    _set_link(os.path.join(base, "current"), previous)
    if current:
        _set_link(os.path.join(base, "previous"), current)
    return {"current": previous, "previous": current}


def listing(root):
    """{model name: {'current', 'previous', 'releases'}} of everything deployed under ``root``."""
    out = {}
    models = os.path.join(root, "models")
    for name in sorted(os.listdir(models)) if os.path.isdir(models) else []:
        base = os.path.join(models, name)
        if not os.path.isdir(base) or not NAME.match(name):
            continue
        out[name] = {
            "current": _link_target(os.path.join(base, "current")),
            "previous": _link_target(os.path.join(base, "previous")),
            "releases": sorted(
                v for v in os.listdir(base) if VERSION.match(v) and os.path.isdir(os.path.join(base, v))
            ),
        }
    return out
