"""What a line service runs, in the service's own state folder, readable by the service's account.

``edgerun build`` runs as the login that built the engine and seals the engine's record with that login's key
(``~/.config/edgerun/device.key``, 0600). A systemd service runs as another, unprivileged account (``edgerun``),
which can read neither that key nor, on JetPack 6's 0750 home folders, anything under the login's home (the
bundle, the engine, the edgerun package on ``PYTHONPATH``). So ``edgerun service install`` (as root) stages the
release where the service owns it, ``/var/lib/edgerun/NAME/``:

- ``release/``: a copy of the bundle (``.edb`` or folder) and of the engine, its record re-sealed with the
  service's own key once the installer's key has verified it (an engine the installer cannot vouch for is never
  re-sealed);
- ``device.key``: the service's engine key (0600, the service's), named by ``$EDGERUN_DEVICE_KEY`` in the unit;
- ``lib/edgerun``: the edgerun package the unit's ``PYTHONPATH`` names;
- ``trust/`` and ``pins.json``: the trust set and pins the install checked, named by ``$EDGERUN_TRUST`` and
  ``$EDGERUN_PINS`` in the unit, so the service runs with exactly that trust.

Everything is owned by the service's account; the install then opens and verifies what the unit will run as that
account, with the unit's environment (``check_as``), before it writes the unit. Python 3.6, standard library only.
"""

import json
import os
import pwd
import shutil
import subprocess
import sys

import edgerun
from edgerun.errors import EdgerunError, EngineMismatchError
from edgerun.runtime.engine_record import DEVICE_KEY_ENV, check_sealed, device_key, seal
from edgerun.spec import REQUIRED, Spec

RELEASE = "release"
KEY_FILE = "device.key"
LIB = "lib"
TRUST = "trust"
PINS = "pins.json"


UNSURE = "unsure"  # a classifier's unsure frames, per release or service state folder (camera --save-unsure)
MAPS = "maps"  # an anomaly detector's rejected frames with their map overlays (camera --save-maps)


def kept_frames(task, folder):
    """The camera flags that keep frames for the way back (``edgedistill deploy --pull-frames``), by the bundle's
    task: an anomaly detector's rejected frames with their maps under ``folder/maps``, a classifier's unsure
    frames under ``folder/unsure``; a regression bundle keeps none (both flags read what it does not have)."""
    if task == "anomaly":
        return ["--save-maps", folder + "/" + MAPS]
    if task == "regression":
        return []
    return ["--save-unsure", folder + "/" + UNSURE]


class ReleaseJob(Spec):
    """What ``service install`` stages: the service ``name`` and its ``state_root``, the ``bundle`` and
    ``engine`` (None: ONNX Runtime) it runs, the ``trust`` and ``pins`` paths the install checked it against (None:
    none configured), the service's ``user``, and the installer's engine key file (``installer_key``, default:
    ``$EDGERUN_DEVICE_KEY``, else the sudo login's, else this user's)."""

    FIELDS = {
        "name": REQUIRED,
        "state_root": REQUIRED,
        "bundle": REQUIRED,
        "engine": None,
        "trust": None,
        "pins": None,
        "user": REQUIRED,
        "installer_key": None,
    }


class Staged(Spec):
    """Where the staged release lies: the ``state`` folder, the ``bundle`` and ``engine`` copies, and the
    ``environment`` the unit must carry (PYTHONPATH, the service's key, its trust and pins)."""

    FIELDS = {"state": REQUIRED, "bundle": REQUIRED, "engine": None, "environment": REQUIRED}


def installer_key_path(environ=None):
    """The key ``edgerun build`` sealed the engine with: ``$EDGERUN_DEVICE_KEY``, else, under sudo, the login's
    (``sudo`` keeps ``$SUDO_USER``; ``~`` is root's), else this user's."""
    environ = os.environ if environ is None else environ
    if environ.get(DEVICE_KEY_ENV):
        return environ[DEVICE_KEY_ENV]
    login = environ.get("SUDO_USER")
    if login and os.geteuid() == 0:
        try:
            home = pwd.getpwnam(login).pw_dir
        except KeyError:
            home = None
        if home:
            return os.path.join(home, ".config", "edgerun", KEY_FILE)
    return os.path.join(os.path.expanduser("~"), ".config", "edgerun", KEY_FILE)


def _account(user):
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise EdgerunError("--user %s: no such account" % user) from None
    return entry.pw_uid, entry.pw_gid


def stage(job):
    """Copy the release into ``STATE_ROOT/NAME`` for ``job.user`` (a :class:`ReleaseJob`); returns a
    :class:`Staged`. The old release is replaced only once the new one is complete."""
    uid, gid = _account(job.user)
    if os.geteuid() != 0 and uid != os.geteuid():
        raise EdgerunError(
            "service install stages the release as the service's account '%s': run it with sudo" % job.user
        )
    state = os.path.join(os.path.abspath(job.state_root), job.name)
    _makedirs(state, 0o750)
    fresh = os.path.join(state, RELEASE + ".new")
    _remove(fresh)
    os.makedirs(fresh, 0o750)
    bundle = os.path.join(state, RELEASE, os.path.basename(os.path.normpath(job.bundle)))
    _copy(job.bundle, os.path.join(fresh, os.path.basename(bundle)))
    engine = None
    key_path = os.path.join(state, KEY_FILE)
    if job.engine:
        engine = os.path.join(state, RELEASE, os.path.basename(job.engine))
        _reseal(job, os.path.join(fresh, os.path.basename(engine)), key_path)
    lib = os.path.join(state, LIB)
    _remove(lib + ".new")
    package = os.path.dirname(os.path.abspath(edgerun.__file__))
    shutil.copytree(package, os.path.join(lib + ".new", "edgerun"), ignore=shutil.ignore_patterns("__pycache__"))
    _swap(lib + ".new", lib)
    environment = [("PYTHONUNBUFFERED", "1"), ("PYTHONPATH", lib), (DEVICE_KEY_ENV, key_path)]
    if job.trust:
        trust = os.path.join(state, TRUST)
        _remove(trust)
        if os.path.isdir(job.trust):
            shutil.copytree(job.trust, trust)
        else:
            os.makedirs(trust)
            shutil.copy2(job.trust, os.path.join(trust, os.path.basename(job.trust)))
        environment.append(("EDGERUN_TRUST", trust))
    if job.pins:
        shutil.copy2(job.pins, os.path.join(state, PINS))
        environment.append(("EDGERUN_PINS", os.path.join(state, PINS)))
    _swap(fresh, os.path.join(state, RELEASE))
    _own(state, uid, gid)
    return Staged(state=state, bundle=bundle, engine=engine, environment=environment)


def _reseal(job, target, key_path):
    """The engine and its record copied to ``target``, the record checked with the installer's key and sealed
    again with the service's (created at ``key_path`` when absent)."""
    from edgerun.runtime.trt import engine_meta_path

    record = engine_meta_path(job.engine)
    try:
        with open(job.engine, "rb") as fh:
            engine_bytes = fh.read()
        with open(record) as fh:
            meta = json.load(fh)
    except (OSError, IOError, ValueError) as exc:
        raise EngineMismatchError(
            "--engine %s: cannot read the engine and its record %s (%s): build it with `edgerun build`"
            % (job.engine, record, exc)
        ) from exc
    if not isinstance(meta, dict):
        raise EngineMismatchError("--engine %s: its record %s is not a JSON object: rebuild it" % (job.engine, record))
    mine = job.installer_key or installer_key_path()
    check_sealed(meta, engine_bytes, job.engine, device_key(environ={DEVICE_KEY_ENV: mine}))
    service_key = device_key(create=True, environ={DEVICE_KEY_ENV: key_path})
    with open(target, "wb") as fh:
        fh.write(engine_bytes)
    with open(engine_meta_path(target), "w") as fh:
        json.dump(seal(meta, engine_bytes, service_key), fh, indent=2, sort_keys=True)


def check_as(user, argv, environment, run=subprocess.run):
    """Run ``argv`` as ``user`` with exactly ``environment`` (the unit's: nothing inherited but PATH and LANG,
    HOME the state folder), as systemd would start it; an :class:`EdgerunError` with its output when it fails."""
    uid, gid = _account(user)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": os.environ.get("LANG", "C.UTF-8")}
    env.update(environment)
    drop = None
    if os.geteuid() == 0 and uid != 0:

        def drop():
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)

    elif uid != os.geteuid():
        raise EdgerunError("cannot check the service as '%s' without root: run service install with sudo" % user)
    try:
        done = run(
            argv,
            env=env,
            cwd="/",
            preexec_fn=drop,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            universal_newlines=True,
        )
    except (OSError, subprocess.SubprocessError) as exc:  # the interpreter itself out of the account's reach
        raise EdgerunError(
            "as the service's account '%s', %s cannot be started (%s): the unit's python and its packages must be "
            "readable by that account (a virtualenv in a 0750 home is not); pass --python /usr/bin/python3 or "
            "install edgerun's requirements system-wide; no unit was written" % (user, argv[0], exc)
        ) from exc
    if done.returncode != 0:
        raise EdgerunError(
            "as the service's account '%s', `%s` failed (exit %d), so the service could not run it; no unit "
            "was written:\n%s" % (user, " ".join(argv), done.returncode, done.stdout.strip()[-2000:])
        )
    return done.stdout


def verify_argv(python, staged):
    """The check the install runs as the service's account: the bundle opened with the unit's trust and pins,
    and the engine's record verified with the service's key."""
    argv = [python or sys.executable, "-m", "edgerun.cli", "verify", staged.bundle]
    if staged.engine:
        argv += ["--engine", staged.engine]
    return argv


def _makedirs(path, mode):
    if not os.path.isdir(path):
        os.makedirs(path, mode)


def _remove(path):
    if os.path.islink(path) or os.path.isfile(path):
        os.remove(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


def _copy(source, target):
    if os.path.isdir(source):
        shutil.copytree(source, target)
    else:
        shutil.copy2(source, target)


def _swap(fresh, final):
    """``fresh`` in place of ``final``: the old one kept until the rename."""
    old = final + ".old"
    _remove(old)
    if os.path.exists(final):
        os.rename(final, old)
    os.rename(fresh, final)
    _remove(old)


def _own(path, uid, gid):
    """``path`` and everything under it owned by the service's account (as root; a user installing for itself
    owns it already)."""
    if os.geteuid() != 0:
        return
    os.chown(path, uid, gid)
    for folder, dirs, files in os.walk(path):
        for name in dirs + files:
            os.lchown(os.path.join(folder, name), uid, gid)
