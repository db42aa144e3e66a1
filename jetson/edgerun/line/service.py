"""The line as a service: a systemd unit that runs ``edgerun camera`` around the clock, and the heartbeat that
tells systemd (and ``edgerun service status``) the loop is alive.

The unit restarts the camera on failure (a lost camera ends the run with exit 1 after its reconnects), kills and
restarts it when the watchdog is not fed (a hung capture or inference: ``WatchdogSec``), logs to the journal,
and runs as an unprivileged user with the camera's group (``video``) and a state folder of its own
(``StateDirectory``, /var/lib/edgerun/<name>) for its status file and the frames it was unsure of. The
heartbeat speaks systemd's notify protocol (sd_notify(3): READY=1, WATCHDOG=1, STATUS=...) over the datagram
socket in $NOTIFY_SOCKET with the standard library alone. Python 3.6, no torch.
"""

import json
import os
import socket
import subprocess
import sys
import time

import edgerun
from edgerun.errors import EdgerunError
from edgerun.files import write_atomically
from edgerun.spec import REQUIRED, Spec

UNIT_DIR = "/etc/systemd/system"
STATE_ROOT = "/var/lib/edgerun"
STATUS_FILE = "status.json"


def sd_notify(message, environ=None):
    """Send ``message`` to systemd's notify socket; False when not run by systemd (no $NOTIFY_SOCKET)."""
    path = (environ if environ is not None else os.environ).get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):  # an abstract socket
        path = "\0" + path[1:]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.connect(path)
        sock.sendall(message.encode("utf-8"))
    except (OSError, IOError):
        return False
    finally:
        sock.close()
    return True


def watchdog_interval(environ=None):
    """Seconds between WATCHDOG=1 pings: half of systemd's $WATCHDOG_USEC, None when no watchdog is set."""
    env = environ if environ is not None else os.environ
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec) / 2e6, 0.05)
    except ValueError:
        return None


class Heartbeat(object):
    """Called every frame with the loop's counters: feeds the watchdog, tells systemd READY and a STATUS line,
    and writes ``status_path`` (atomically) every ``interval_s`` seconds for ``edgerun service status``."""

    def __init__(self, status_path=None, interval_s=5.0, environ=None, clock=time.time, keep_verdicts=20):
        self.status_path = status_path
        self.interval_s = float(interval_s)
        self.environ = environ if environ is not None else os.environ
        self.clock = clock
        self.watchdog_s = watchdog_interval(self.environ)
        self.ready = False
        self.started = clock()
        self.last_status = None
        self.last_ping = None
        self.verdicts = []
        self.keep = keep_verdicts
        self.state = {}

    def verdict(self, frame, text):
        """A REJECT (or any verdict line) to show in the status, newest last."""
        self.verdicts.append({"frame": frame, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "text": text})
        del self.verdicts[: -self.keep]

    def tick(self, state):
        now = self.clock()
        self.state = state
        if not self.ready:
            sd_notify("READY=1\nSTATUS=classifying", self.environ)
            self.ready = True
        if self.watchdog_s and (self.last_ping is None or now - self.last_ping >= self.watchdog_s):
            sd_notify("WATCHDOG=1", self.environ)
            self.last_ping = now
        if self.last_status is None or now - self.last_status >= self.interval_s:
            self.last_status = now
            self.write(state, now)

    def write(self, state, now=None):
        now = self.clock() if now is None else now
        seconds = max(state.get("seconds") or 0.0, 1e-9)
        status = dict(
            state,
            fps=state.get("frames", 0) / seconds,
            updated=time.strftime("%Y-%m-%dT%H:%M:%S"),
            pid=os.getpid(),
            last_verdicts=list(self.verdicts),
        )
        sd_notify(
            "STATUS=%.1f FPS, %d frames, %d dropped, %d reconnects, %d rejects"
            % (
                status["fps"],
                state.get("frames", 0),
                state.get("dropped", 0),
                state.get("reconnects", 0),
                state.get("rejects", 0),
            ),
            self.environ,
        )
        if self.status_path:
            write_atomically(self.status_path, json.dumps(status, indent=2, sort_keys=True).encode("utf-8"))

    def stopping(self):
        sd_notify("STOPPING=1", self.environ)


def check_unit_value(what, value):
    """A value bound for a unit file, a config or a label file: no control characters (a newline would start a
    directive of its own)."""
    value = str(value)
    bad = [c for c in value if ord(c) < 32 or ord(c) == 127]
    if bad:
        raise EdgerunError(
            "%s %r holds a control character (%r): a newline or tab there would write directives of its own "
            "into the unit; give it without" % (what, value, bad[0])
        )
    return value


def _quoted(text):
    return '"%s"' % text.replace("\\", "\\\\").replace('"', '\\"')


def exec_word(word, what="an ExecStart argument"):
    """A word for systemd's ExecStart (systemd.service(5), "Command lines"): ``%`` written ``%%`` (specifiers)
    and ``$`` written ``$$`` (variable substitution), double-quoted with backslash escapes unless plain."""
    word = check_unit_value(what, word).replace("%", "%%").replace("$", "$$")
    if word and all(c.isalnum() or c in "-_./:=@+," for c in word):
        return word
    return _quoted(word)


def plain_path(path):
    """A folder for WorkingDirectory= and ReadWritePaths= (which take no quotes): absolute, plain characters."""
    if not path.startswith("/") or not all(c.isalnum() or c in "-_./" for c in path) or "/../" in path + "/":
        raise EdgerunError(
            "the state folder '%s': an absolute path of letters, digits, '-', '_', '.' and '/' only (systemd's "
            "WorkingDirectory= takes no quotes); pass another --state-root" % path
        )
    return path


def environment_line(key, value):
    """``Environment="KEY=value"`` (systemd.exec(5)): quoted, ``%`` written ``%%``; ``$`` has no special
    meaning there and is written as it is."""
    check_unit_value("the environment variable name", key)
    value = check_unit_value("the value of %s" % key, value).replace("%", "%%")
    return "Environment=%s" % _quoted("%s=%s" % (key, value))


class ServiceUnit(Spec):
    """The service ``edgerun service install`` writes: its ``name`` (edgerun-NAME, state in /var/lib/edgerun/NAME),
    the ``edgerun camera`` arguments it runs, the unprivileged ``user`` and the camera devices' ``group``, the
    ``python`` that runs it (default: this one), systemd's watchdog and restart delay, a description."""

    FIELDS = {
        "name": REQUIRED,
        "camera_args": REQUIRED,
        "user": REQUIRED,
        "group": REQUIRED,
        "python": None,
        "watchdog_s": 30,
        "restart_s": 5,
        "description": None,
        "state": None,
        "environment": None,
    }


def unit_text(unit):
    """The systemd unit that runs ``edgerun camera CAMERA_ARGS`` as ``unit.user``; its state in
    /var/lib/edgerun/NAME."""
    name, user, group = unit.name, unit.user, unit.group
    python = unit.python or sys.executable
    state = unit.state or "%s/%s" % (STATE_ROOT, name)
    environment = unit.environment or [
        ("PYTHONUNBUFFERED", "1"),
        ("PYTHONPATH", os.path.dirname(os.path.dirname(os.path.abspath(edgerun.__file__)))),
    ]
    if os.path.dirname(state) == STATE_ROOT:
        where = ["StateDirectory=edgerun/%s" % name]  # systemd creates it and gives it to User=
    else:
        where = ["ReadWritePaths=%s" % plain_path(state)]
    exec_words = (
        [python, "-m", "edgerun.cli", "camera"]
        + list(unit.camera_args)
        + ["--status-file", "%s/%s" % (state, STATUS_FILE)]
    )
    return "\n".join(
        [
            "# written by `edgerun service install`; edgerun service status %s" % name,
            "[Unit]",
            "Description=%s"
            % check_unit_value("the description", unit.description or "edgerun line camera (%s)" % name).replace(
                "%", "%%"
            ),
            "After=network-online.target",
            "Wants=network-online.target",
            "StartLimitIntervalSec=600",
            "StartLimitBurst=20",
            "",
            "[Service]",
            "Type=notify",
            "NotifyAccess=main",
            "ExecStart=%s" % " ".join(exec_word(w) for w in exec_words),
            "User=%s" % user,
            "Group=%s" % user,
            "SupplementaryGroups=%s" % group,
            "Restart=on-failure",
            "RestartSec=%d" % unit.restart_s,
            "WatchdogSec=%d" % unit.watchdog_s,
            "TimeoutStartSec=300",
        ]
        + where
        + ["WorkingDirectory=%s" % plain_path(state)]
        + [environment_line(k, v) for k, v in environment]
        + [
            "StandardOutput=journal",
            "StandardError=journal",
            "SyslogIdentifier=edgerun-%s" % name,
            "NoNewPrivileges=yes",
            "PrivateTmp=yes",
            "ProtectSystem=full",
            "ProtectHome=read-only",
            "",
            "[Install]",
            "WantedBy=multi-user.target",
            "",
        ]
    )


def check_name(name):
    if not name or not all(c.isalnum() or c in "-_" for c in name):
        raise EdgerunError(
            "--name '%s': letters, digits, '-' and '_' only (it names the unit and its state folder)" % name
        )
    return name


def check_user(user, group):
    """The service's account must exist and must not be root; the camera group must exist."""
    import grp
    import pwd

    if user in ("root", "0"):
        raise EdgerunError(
            "--user root: the line runs unprivileged; create an account: sudo useradd --system "
            "--groups %s --home-dir %s edgerun" % (group, STATE_ROOT)
        )
    try:
        pwd.getpwnam(user)
    except KeyError:
        raise EdgerunError(
            "--user %s: no such account; create it: sudo useradd --system --groups %s --home-dir %s "
            "%s" % (user, group, STATE_ROOT, user)
        ) from None
    try:
        grp.getgrnam(group)
    except KeyError:
        raise EdgerunError("--group %s: no such group (the camera devices' group, usually video)" % group) from None


def install(unit, unit_dir=UNIT_DIR, enable=True, run=subprocess.call):
    """Write ``unit_dir``/edgerun-NAME.service for ``unit`` (a :class:`ServiceUnit`, atomically) and, with
    ``enable``, reload systemd and enable and start it. Returns the unit's path."""
    name = unit.name
    check_name(name)
    check_user(unit.user, unit.group)
    if unit.watchdog_s < 5:
        raise EdgerunError(
            "--watchdog %d: at least 5 seconds (an engine's first inference can take seconds)" % unit.watchdog_s
        )
    if not os.path.isdir(unit_dir):
        raise EdgerunError("--unit-dir %s does not exist" % unit_dir)
    path = os.path.join(unit_dir, "edgerun-%s.service" % name)
    text = unit_text(unit)
    try:
        write_atomically(path, text.encode("utf-8"))
    except (OSError, IOError) as exc:
        raise EdgerunError("cannot write %s (%s): run it with sudo, or pass --unit-dir" % (path, exc)) from exc
    if enable:
        for command in (["systemctl", "daemon-reload"], ["systemctl", "enable", "--now", "edgerun-%s" % name]):
            if run(command) != 0:
                raise EdgerunError(
                    "`%s` failed; the unit is written at %s (see journalctl -u edgerun-%s)"
                    % (" ".join(command), path, name)
                )
    return path


def status(name, state_root=STATE_ROOT, run=subprocess.run):
    """{'unit': systemd's ActiveState/SubState/NRestarts (None where systemctl is absent), 'status': the camera's
    status file (None before its first write)}."""
    check_name(name)
    unit = None
    try:
        done = run(
            [
                "systemctl",
                "show",
                "edgerun-%s" % name,
                "--property=ActiveState,SubState,NRestarts,ExecMainStartTimestamp",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            universal_newlines=True,
        )
        if done.returncode == 0:
            unit = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    except OSError:
        unit = None
    path = os.path.join(state_root, name, STATUS_FILE)
    data = None
    if os.path.exists(path):
        try:
            with open(path, "rb") as fh:
                data = json.loads(fh.read().decode("utf-8"))
        except (OSError, IOError) as exc:
            raise EdgerunError("%s cannot be read (%s): run `edgerun service status` as root" % (path, exc)) from exc
        except ValueError as exc:  # UnicodeDecodeError included
            raise EdgerunError("%s is not valid JSON (%s)" % (path, exc)) from exc
        check_status(data, path)
    return {"unit": unit, "status": data, "status_file": path}


STATUS_NUMBERS = ("fps", "frames", "dropped", "reconnects", "rejects")


def check_status(data, path):
    """The camera's status record as `service status` prints it: an object, its counters numbers, its verdicts
    {time, frame, text}. Anything else was not written by the camera: say which key, never a traceback."""
    how = "; the running camera rewrites it every 5 s (a stopped one leaves it: remove it)"
    if not isinstance(data, dict):
        raise EdgerunError("%s is not a status record (a JSON object), but %s%s" % (path, type(data).__name__, how))
    for key in STATUS_NUMBERS:
        value = data.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise EdgerunError("%s: '%s' is %r, not a number%s" % (path, key, value, how))
    verdicts = data.get("last_verdicts", [])
    if not isinstance(verdicts, list) or not all(
        isinstance(v, dict) and isinstance(v.get("frame"), int) and "time" in v and "text" in v for v in verdicts
    ):
        raise EdgerunError("%s: 'last_verdicts' is not a list of {time, frame, text}%s" % (path, how))
