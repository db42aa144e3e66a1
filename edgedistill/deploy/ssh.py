"""OpenSSH as the transport to a board: the user's ~/.ssh/config, agent and known_hosts work unchanged.

Every call is the system's ``ssh`` with ``BatchMode=yes`` (never a password prompt that hangs a fleet run) and
``StrictHostKeyChecking=yes`` (a host key is checked against known_hosts, never accepted on first sight). Files
travel through the same connection (``cat`` in, ``cat``/``tar`` out), so nothing but ``ssh`` is needed here and
nothing but a POSIX shell there.
"""

from __future__ import annotations

import io
import shlex
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Optional, Sequence

from edgedistill.errors import EdgedistillError

SSH_EXIT = 255  # ssh's own failure (connection, authentication, host key); anything else is the remote command's


class SshError(EdgedistillError):
    """The board cannot be reached or refused the connection (its host key, the user's key)."""


class RemoteError(EdgedistillError):
    """A command on the board failed; ``rc`` and ``stderr`` say how."""

    def __init__(self, message: str, rc: int, stderr: str):
        super().__init__(message)
        self.rc, self.stderr = rc, stderr


def quote(*words: str) -> str:
    return " ".join(shlex.quote(str(w)) for w in words)


class SshHost:
    """One board: ``dest`` as ssh takes it (``user@board``, a Host alias of ~/.ssh/config, ``ssh://user@h:2222``)."""

    def __init__(
        self,
        dest: str,
        config: Optional[str] = None,
        options: Sequence[str] = (),
        connect_timeout: int = 15,
        ssh: str = "ssh",
    ):
        if not dest or dest.startswith("-"):
            raise EdgedistillError(f"--host '{dest}' is not a host: give user@board or a Host name of ~/.ssh/config")
        if shutil.which(ssh) is None:
            raise EdgedistillError(
                f"'{ssh}' is not installed: deploy needs the OpenSSH client (apt install openssh-client)"
            )
        self.dest = dest
        self.base = [
            ssh,
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            f"ConnectTimeout={int(connect_timeout)}",
            "-o",
            "ServerAliveInterval=15",
        ]
        if config:
            self.base += ["-F", str(config)]
        for option in options:
            self.base += ["-o", option]

    def run(
        self, command: str, stdin: Optional[bytes] = None, timeout: Optional[float] = None, check: bool = True
    ) -> subprocess.CompletedProcess:
        """Run ``command`` (a shell line, quoted by the caller with :func:`quote`) on the board."""
        argv = self.base + [self.dest, "--", command]
        try:
            done = subprocess.run(
                argv,
                input=stdin if stdin is not None else b"",
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise RemoteError(f"{self.dest}: `{command}` did not finish in {timeout:.0f} s", -1, "") from None
        err = done.stderr.decode("utf-8", "replace").strip()
        if done.returncode == SSH_EXIT:
            reason = err.splitlines()[-1] if err else "ssh failed"
            hint = ""
            if "Host key verification failed" in err or "REMOTE HOST IDENTIFICATION HAS CHANGED" in err:
                hint = (
                    ": its host key is not in known_hosts (or changed); check it and add it with "
                    f"`ssh {self.dest}` once, deploy never accepts one itself"
                )
            elif "Permission denied" in err:
                hint = ": the key was refused; load it in ssh-agent or name it in ~/.ssh/config (IdentityFile)"
            raise SshError(f"cannot reach {self.dest}: {reason}{hint}")
        if check and done.returncode != 0:
            last = err.splitlines()[-1] if err else "no message"
            raise RemoteError(f"{self.dest}: `{command}` exited {done.returncode}: {last}", done.returncode, err)
        return done

    def put(self, local: Path, remote: str, timeout: float = 600) -> None:
        """Copy a file to ``remote`` (a path on the board), written beside and renamed into place."""
        folder = remote.rsplit("/", 1)[0] if "/" in remote else "."
        tmp = f"{remote}.part"
        self.run(
            f"mkdir -p {quote(folder)} && cat > {quote(tmp)} && mv -f {quote(tmp)} {quote(remote)}",
            stdin=Path(local).read_bytes(),
            timeout=timeout,
        )

    def read(self, remote: str, timeout: float = 120) -> bytes:
        return self.run(f"cat {quote(remote)}", timeout=timeout).stdout

    def exists(self, remote: str) -> bool:
        return self.run(f"test -e {quote(remote)}", check=False).returncode == 0

    def fetch_tree(self, remote: str, local: Path, max_bytes: int = 1 << 30, timeout: float = 600) -> list[Path]:
        """Copy the regular files under ``remote`` into ``local``: a tar stream checked member by member (no
        links, devices, absolute paths or '..'; at most ``max_bytes``). Returns the files written."""
        data = self.run(f"tar -C {quote(remote)} -cf - .", timeout=timeout).stdout
        if len(data) > max_bytes:
            raise RemoteError(f"{self.dest}:{remote} holds more than {max_bytes >> 20} MB; nothing copied", 0, "")
        written = []
        local = Path(local)
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
            for member in archive.getmembers():
                name = Path(member.name)
                if member.isdir() or member.name in (".", "./"):
                    continue
                if not member.isfile() or name.is_absolute() or ".." in name.parts:
                    raise RemoteError(
                        f"{self.dest}:{remote}: '{member.name}' is not a plain file inside the "
                        "folder; nothing more copied",
                        0,
                        "",
                    )
                target = local / name
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.extractfile(member) as src:
                    target.write_bytes(src.read())
                written.append(target)
        return written
