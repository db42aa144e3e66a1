"""Where a device setting comes from: the command line, else an environment variable, else a file or folder on
the device. Given but empty (``--trust ''``, ``--pins "$UNSET"``, ``EDGERUN_TRUST=``) is an error, never "off":
a script with an unset variable must not turn a safety check off. Python 3.6."""

import os

from edgerun.spec import REQUIRED, Spec


class Setting(Spec):
    """One device setting: its ``flag`` (--trust), environment variable, the device's ``default`` path and the test
    that it ``exists`` there, the ``error`` class to raise, ``what`` to name ("a pins file") and what an empty value
    would have turned ``off`` ("the pins")."""

    FIELDS = {
        "flag": REQUIRED,
        "env_name": REQUIRED,
        "default": REQUIRED,
        "exists": REQUIRED,
        "error": REQUIRED,
        "what": REQUIRED,
        "off": REQUIRED,
    }


def resolve_setting(explicit, setting, environ=None):
    """``explicit`` (the flag's value, None when not given), else ``$env_name``, else ``default`` when
    ``exists(default)``, else None."""
    environ = os.environ if environ is None else environ
    s = setting
    if explicit is not None:
        if not str(explicit).strip():
            raise s.error(
                "%s is empty (an unset variable in a script?): name %s; an empty value never turns %s off "
                "(leave %s out to use $%s or %s)" % (s.flag, s.what, s.off, s.flag, s.env_name, s.default)
            )
        return str(explicit)
    if s.env_name in environ:
        if not environ[s.env_name].strip():
            raise s.error(
                "$%s is set but empty: name %s, or unset it (an empty value never turns %s off)"
                % (s.env_name, s.what, s.off)
            )
        return environ[s.env_name]
    return s.default if s.exists(s.default) else None
