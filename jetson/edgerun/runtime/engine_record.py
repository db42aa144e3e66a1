"""An engine's record (``<engine>.json``), sealed on the device that built it.

A signed bundle covers the model, not the TensorRT engine built from it on the device. So ``edgerun build`` records
the engine's sha256 in the record and seals the record with an HMAC-SHA256 under a key of this device
(``~/.config/edgerun/device.key``, or ``$EDGERUN_DEVICE_KEY``: 32 random bytes, created on first build, mode 0600,
readable only by the user that builds and runs engines). Before an engine runs, the bytes that TensorRT is handed are
hashed and compared with the record, and the seal is checked: an engine swapped for another, or a record edited to
name another bundle, is refused. Someone who can read the device key (its user, or root) can still forge a record:
the seal protects against everyone else. Python 3.6, standard library only.
"""

import hashlib
import hmac
import json
import os
import stat

from edgerun.errors import EngineMismatchError

DEVICE_KEY_ENV = "EDGERUN_DEVICE_KEY"

SEAL = "record_hmac"


def device_key_path(environ=None):
    environ = os.environ if environ is None else environ
    return environ.get(DEVICE_KEY_ENV) or os.path.join(os.path.expanduser("~"), ".config", "edgerun", "device.key")


def _container_hint(path):
    """In a container, where each `docker run --rm` starts empty: the key lives only as long as a volume."""
    if not os.path.exists("/.dockerenv"):
        return ""
    return (
        " (in a container the key lasts only on a volume: run every container with -v edgerun-state:%s, the "
        "same for build, validate, bench and camera)" % os.path.dirname(path)
    )


def device_key(create=False, environ=None):
    """This device's engine-record key; created (mode 0600) when ``create`` and absent. A key that other users can
    read is refused: it would let them seal records."""
    path = device_key_path(environ)
    try:
        os.stat(path)
        exists = True
    except FileNotFoundError:
        exists = False
    except (OSError, IOError) as exc:  # a folder on the way this user cannot enter: not "no key"
        raise EngineMismatchError(
            "the device's engine key '%s' cannot be read (%s): it belongs to the user that built the engines (a "
            "service has its own: `edgerun service install`)" % (path, exc)
        ) from exc
    if not exists:
        if not create:
            raise EngineMismatchError(
                "this device has no engine key (%s): engines are trusted only when this device "
                "built them; rebuild with `edgerun build`%s" % (path, _container_hint(path))
            )
        folder = os.path.dirname(path)
        if folder and not os.path.isdir(folder):
            os.makedirs(folder, 0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        except OSError as exc:
            if not os.path.exists(path):
                raise EngineMismatchError("cannot create the device's engine key '%s': %s" % (path, exc)) from exc
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(os.urandom(32))
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077:
            raise EngineMismatchError(
                "the device's engine key '%s' is readable by others (mode %o): chmod 600 it" % (path, mode)
            )
        with open(path, "rb") as fh:
            key = fh.read()
    except (OSError, IOError) as exc:
        raise EngineMismatchError(
            "the device's engine key '%s' cannot be read (%s): it belongs to the user that built the engines (a "
            "service has its own: `edgerun service install`); remove it and rebuild if it is damaged" % (path, exc)
        ) from exc
    if len(key) < 32:
        raise EngineMismatchError(
            "the device's engine key '%s' is damaged (%d bytes): remove it and rebuild the engines" % (path, len(key))
        )
    return key


def _digest(meta, key):
    body = dict((k, v) for k, v in meta.items() if k != SEAL)
    return hmac.new(key, json.dumps(body, sort_keys=True).encode("utf-8"), hashlib.sha256).hexdigest()


def seal(meta, engine_bytes, key):
    """``meta`` with the engine's sha256 and the seal added."""
    meta = dict(meta, engine_sha256=hashlib.sha256(engine_bytes).hexdigest())
    meta[SEAL] = _digest(meta, key)
    return meta


def check_sealed(meta, engine_bytes, engine_path, key):
    """Refuse an engine whose bytes differ from its record, or a record this device's key did not seal."""
    if SEAL not in meta or "engine_sha256" not in meta:
        raise EngineMismatchError(
            "engine '%s' has an unsealed record (built by an older edgerun, or written by hand): "
            "rebuild it with `edgerun build`" % engine_path
        )
    if not hmac.compare_digest(str(meta[SEAL]), _digest(meta, key)):
        raise EngineMismatchError(
            "the record of engine '%s' was not sealed by this device's key (edited, or from "
            "another device): rebuild the engine with `edgerun build`" % engine_path
        )
    actual = hashlib.sha256(engine_bytes).hexdigest()
    if actual != meta["engine_sha256"]:
        raise EngineMismatchError(
            "engine '%s' is not the engine its record describes (sha256 %s..., recorded %s...): "
            "it was replaced or damaged; rebuild it with `edgerun build`"
            % (engine_path, actual[:12], meta["engine_sha256"][:12])
        )
