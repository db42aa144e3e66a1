"""Files written atomically (a temporary name, then a rename). Python 3.6, standard library only."""

import os


def write_atomically(path, data):
    """Write ``data`` (bytes) to ``path`` through a temporary file and a rename."""
    tmp = "%s.tmp-%d" % (path, os.getpid())
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
