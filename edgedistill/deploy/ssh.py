"""OpenSSH as the transport to a board: the user's ~/.ssh/config, agent and known_hosts work unchanged.

Every call is the system's ``ssh`` with ``BatchMode=yes`` (never a password prompt that hangs a fleet run) and
``StrictHostKeyChecking=yes`` (a host key is checked against known_hosts, never accepted on first sight). Files
travel through the same connection (``cat`` in, ``cat``/``tar`` out), so nothing but ``ssh`` is needed here and
nothing but a POSIX shell there.

A command on the board is tied to its connection (``tied``): it runs in a process group of its own beside a
watcher that reads the session's input, which this side keeps open until the command ends. When the connection
goes (deploy killed, a step's timeout, the network), the watcher reads end-of-file and ends the command's group:
nothing keeps running on the board after deploy has given up on it. What comes back is read as it arrives and
capped while reading (``fetch_tree``), never whole into memory first.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import tarfile
import tempfile
import threading
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
        """Run ``command`` (a shell line, quoted by the caller with :func:`quote`) on the board; without ``stdin``
        it is tied to the connection (:func:`tied`) and ends when the connection does."""
        remote = command if stdin is not None else tied(command)
        proc = subprocess.Popen(
            self.base + [self.dest, "--", remote],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err_bytes = _Drain(proc.stdout), _Drain(proc.stderr)
        try:
            if stdin:
                proc.stdin.write(stdin)
            if stdin is not None:
                proc.stdin.close()  # the data's end; a tied command keeps its input open instead
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()  # the connection goes, and the command on the board with it
            proc.wait()
            raise RemoteError(
                f"{self.dest}: `{command}` did not finish in {timeout:.0f} s (stopped there)", -1, ""
            ) from None
        except BrokenPipeError:
            proc.wait(timeout=timeout)
        finally:
            if not proc.stdin.closed:
                proc.stdin.close()
        done = subprocess.CompletedProcess(proc.args, proc.returncode, out.join(), err_bytes.join())
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
        """Copy the regular files under ``remote`` into ``local``: a tar stream spooled to a temporary file as it
        arrives and stopped past ``max_bytes`` (never held whole in memory), then checked member by member (no
        links, devices, absolute paths or '..'). Returns the files written."""
        argv = self.base + [self.dest, "--", tied(f"tar -C {quote(remote)} -cf - .")]
        with tempfile.TemporaryFile() as spool:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            err = _Drain(proc.stderr)
            timer = threading.Timer(timeout, proc.kill)
            timer.start()
            total, over = 0, False
            try:
                for chunk in iter(lambda: proc.stdout.read(1 << 16), b""):
                    total += len(chunk)
                    if total > max_bytes:
                        over = True
                        proc.kill()
                        break
                    spool.write(chunk)
            finally:
                timer.cancel()
                proc.stdin.close()
                proc.wait()
            if over:
                raise RemoteError(f"{self.dest}:{remote} holds more than {max_bytes >> 20} MB; nothing copied", 0, "")
            if proc.returncode == SSH_EXIT:
                raise SshError(f"cannot reach {self.dest}: {err.join().decode('utf-8', 'replace').strip()}")
            if proc.returncode != 0:
                raise RemoteError(
                    f"{self.dest}: cannot read {remote} (exit {proc.returncode}, or past {timeout:.0f} s)",
                    proc.returncode,
                    err.join().decode("utf-8", "replace"),
                )
            spool.seek(0)
            return _unpack(spool, Path(local), f"{self.dest}:{remote}")


def _unpack(stream, local: Path, where: str) -> list[Path]:
    written = []
    with tarfile.open(fileobj=stream, mode="r:") as archive:
        for member in archive:
            name = Path(member.name)
            if member.isdir() or member.name in (".", "./"):
                continue
            if not member.isfile() or name.is_absolute() or ".." in name.parts:
                raise RemoteError(
                    f"{where}: '{member.name}' is not a plain file inside the folder; nothing more copied", 0, ""
                )
            target = local / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.extractfile(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            written.append(target)
    return written


class _Drain:
    """A pipe read to its end by a thread of its own (so that neither pipe of ssh fills and blocks the other)."""

    def __init__(self, pipe):
        self.parts: list[bytes] = []
        self.thread = threading.Thread(target=lambda: self.parts.extend(iter(lambda: pipe.read(1 << 16), b"")))
        self.thread.daemon = True
        self.thread.start()

    def join(self) -> bytes:
        self.thread.join()
        return b"".join(self.parts)


def tied(command: str) -> str:
    """``command`` for the board's shell (any POSIX sh, no job control), ended with its connection: started in a
    session of its own (``setsid``, where the board has it) with its input closed, beside a watcher that reads the
    session's input (kept on fd 3: an asynchronous list's own input is /dev/null) and, at its end (the connection
    gone), sends the command's process group TERM, then KILL. Its exit status is the command's; the watcher holds
    none of the session's output, so the session ends with the command."""
    inner = shlex.quote(command)
    group = "kill -{sig} -$pid 2>/dev/null || kill -{sig} $pid 2>/dev/null"
    return (
        "exec 3<&0; "
        f"if command -v setsid >/dev/null 2>&1; then setsid sh -c {inner} </dev/null & "
        f"else sh -c {inner} </dev/null & fi; pid=$!; "
        f"( cat <&3 >/dev/null; {group.format(sig='TERM')}; sleep 3; {group.format(sig='KILL')} ) "
        ">/dev/null 2>&1 & watcher=$!; exec 3<&-; "
        "wait $pid; rc=$?; kill $watcher 2>/dev/null; exit $rc"
    )
