"""Where a device setting comes from: the command line, else an environment variable, else a file or folder on
the device. Given but empty (``--trust ''``, ``--pins "$UNSET"``, ``EDGERUN_TRUST=``) is an error, never "off":
a script with an unset variable must not turn a safety check off. Python 3.6."""
import os


def resolve_setting(explicit, env_name, default, exists, error, flag, what, off, environ=None):
    """``explicit`` (the flag's value, None when not given), else ``$env_name``, else ``default`` when
    ``exists(default)``, else None. ``error``: the exception class; ``what``: what to name ("a pins file");
    ``off``: what an empty value would have turned off ("the pins")."""
    environ = os.environ if environ is None else environ
    if explicit is not None:
        if not str(explicit).strip():
            raise error("%s is empty (an unset variable in a script?): name %s; an empty value never turns %s off "
                        "(leave %s out to use $%s or %s)" % (flag, what, off, flag, env_name, default))
        return str(explicit)
    if env_name in environ:
        if not environ[env_name].strip():
            raise error("$%s is set but empty: name %s, or unset it (an empty value never turns %s off)"
                        % (env_name, what, off))
        return environ[env_name]
    return default if exists(default) else None
