"""The ``exec`` VMM driver (OpenNebula's ``one_vmm_exec``): one executable per action in a
directory; arguments as the seed gives them, the deployment XML on standard input for ``deploy``;
exit 0 with the result on stdout is success, anything else is a failure whose message is stderr.

Driver arguments (``[[hosts]] vmm_args``):

* ``-r N``: retry a failed action N more times;
* ``-t N``: at most N actions of this driver at the same time on this host, whichever vmkeep
  process runs them (slots are ``flock``-ed files in the data dir);
* ``-l ACTION[=SCRIPT],...``: actions run on this machine; with ``=SCRIPT`` another executable of
  the directory runs instead. The others run on the host: locally when the host's URI has no
  host name, else through ``ssh`` to it.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit
from xml.sax.saxutils import escape

from vmkeep.errors import InvalidValue, VmmError
from vmkeep.hypervisor.vmm import (
    ACTIONS,
    DiskSpec,
    Migration,
    NicSpec,
    Progress,
    Vmm,
    parse_poll,
)

ACTION_TIMEOUT = 600.0


@dataclass(frozen=True)
class ExecArgs:
    retries: int = 0
    threads: int = 15
    local: dict[str, str] = field(default_factory=dict)  # action -> script (itself by default)


def parse_args(text: str) -> ExecArgs:
    """``-r N -t N -l a,b=script``; errors name the bad part."""
    argv = shlex.split(text)
    retries, threads, local = 0, 15, {}
    i = 0
    while i < len(argv):
        opt = argv[i]
        if opt not in ("-r", "-t", "-l") or i + 1 >= len(argv):
            raise InvalidValue("vmm_args", text, "use -r N, -t N and -l ACTION[=SCRIPT],...")
        value = argv[i + 1]
        if opt in ("-r", "-t"):
            if not value.isdigit() or (opt == "-t" and int(value) < 1):
                raise InvalidValue("vmm_args", text, f"{opt} takes a whole number (-t >= 1)")
            if opt == "-r":
                retries = int(value)
            else:
                threads = int(value)
        else:
            for item in value.split(","):
                action, _, script = item.partition("=")
                if action not in ACTIONS:
                    raise InvalidValue(
                        "vmm_args", action, f"-l takes actions of {', '.join(ACTIONS)}"
                    )
                local[action] = script or action
        i += 2
    return ExecArgs(retries, threads, local)


def drv_action(disk: DiskSpec) -> str:
    """The seed's DRV_ACTION argument: base64 of the action XML (DISK[ATTACH='YES'])."""
    xml = (
        "<VMM_DRIVER_ACTION_DATA><VM><TEMPLATE><DISK>"
        f"<ATTACH>YES</ATTACH><DRIVER>{escape(disk.fmt)}</DRIVER><TYPE>file</TYPE>"
        f"<READONLY>{'YES' if disk.readonly else 'NO'}</READONLY><CACHE>{escape(disk.cache)}</CACHE>"
        f"<SOURCE>{escape(disk.source)}</SOURCE><TARGET>{escape(disk.target)}</TARGET>"
        "</DISK></TEMPLATE></VM></VMM_DRIVER_ACTION_DATA>"
    )
    return base64.b64encode(xml.encode()).decode()


class ExecVmm(Vmm):
    kind = "exec"

    def __init__(
        self,
        directory: Path,
        args: ExecArgs,
        host_uri: str,
        slots_dir: Path,
        timeout: float = ACTION_TIMEOUT,
    ) -> None:
        self.dir = directory
        self.args = args
        self.host = urlsplit(host_uri).hostname or ""  # "" = this machine
        self.host_arg = self.host or "localhost"
        key = hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:12]
        self.slots_dir = slots_dir / f"exec-{key}"  # one set of -t slots per driver folder
        self.timeout = timeout
        if not directory.is_dir():
            raise InvalidValue("vmm_dir", str(directory), "no such folder of driver scripts")

    # --- running one action -----------------------------------------------------------------------
    @contextlib.contextmanager
    def _slot(self) -> Iterator[None]:
        """One of ``-t`` slots, shared by every vmkeep process on this machine."""
        self.slots_dir.mkdir(parents=True, exist_ok=True)
        while True:
            for n in range(self.args.threads):
                f = open(self.slots_dir / f"slot-{n}", "a+")  # noqa: SIM115 (held while it runs)
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    f.close()
                    continue
                try:
                    yield
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)
                    f.close()
                return
            time.sleep(0.05)

    def _argv(self, action: str, args: list[str]) -> list[str]:
        script = self.args.local.get(action, action)
        path = self.dir / script
        if action in self.args.local or not self.host:
            if not os.access(path, os.X_OK):
                raise VmmError("exec", action, f"{path} is missing or not executable")
            return [str(path), *args]
        remote = " ".join(shlex.quote(a) for a in [str(path), *args])
        return ["ssh", "-o", "BatchMode=yes", self.host, remote]

    def run(self, action: str, args: list[str], stdin: str | None = None) -> str:
        """Run ``action`` (retried ``-r`` times); its stdout, or VmmError with its stderr."""
        argv = self._argv(action, args)
        attempts = self.args.retries + 1
        last = ""
        for attempt in range(attempts):
            with self._slot():
                try:
                    proc = subprocess.run(
                        argv, input=stdin, capture_output=True, text=True, timeout=self.timeout
                    )
                except subprocess.TimeoutExpired:
                    last = f"no answer within {self.timeout:.0f} s"
                    continue
            if proc.returncode == 0:
                return proc.stdout.strip()
            last = proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}"
            if attempt + 1 < attempts:
                time.sleep(min(2.0, 0.2 * 2**attempt))
        tries = f" (tried {attempts} times)" if attempts > 1 else ""
        raise VmmError("exec", action, f"{last}{tries}")

    # --- the actions ------------------------------------------------------------------------------
    def deploy(self, domain: str, xml: str) -> str:
        file = self.slots_dir.parent / "deploy" / f"{domain}.xml"
        file.parent.mkdir(parents=True, exist_ok=True)
        out = self.run("deploy", [str(file), self.host_arg], stdin=xml)
        return out.splitlines()[-1].strip() if out else domain

    def shutdown(self, domain: str) -> None:
        self.run("shutdown", [domain, self.host_arg])

    def cancel(self, domain: str) -> None:
        self.run("cancel", [domain, self.host_arg])

    def reboot(self, domain: str) -> None:
        self.run("reboot", [domain, self.host_arg])

    def reset(self, domain: str) -> None:
        self.run("reset", [domain, self.host_arg])

    def save(self, domain: str, file: str) -> None:
        self.run("save", [domain, file, self.host_arg])

    def restore(self, file: str) -> None:
        self.run("restore", [file, self.host_arg])

    def undefine(self, domain: str) -> None:
        self.run("undefine", [domain, self.host_arg])

    def poll(self, domain: str) -> dict[str, str]:
        record = parse_poll(self.run("poll", [domain, self.host_arg]))
        if record.get("STATE") not in ("a", "p", "e", "d"):
            raise VmmError("exec", "poll", f"STATE must be a, p, e or d; got {record!r}")
        return record

    def snapshot_create(self, domain: str, snapshot_id: int) -> str:
        name = self.run("snapshot_create", [domain, str(snapshot_id)])
        if not name:
            raise VmmError("exec", "snapshot_create", "it printed no snapshot name")
        return name.splitlines()[-1].strip()

    def snapshot_revert(self, domain: str, name: str) -> None:
        self.run("snapshot_revert", [domain, name])

    def snapshot_delete(self, domain: str, name: str) -> None:
        self.run("snapshot_delete", [domain, name])

    def attach_disk(self, domain: str, disk: DiskSpec) -> None:
        args = [domain, disk.source, disk.target, str(disk.index), drv_action(disk)]
        self.run("attach_disk", args)

    def detach_disk(self, domain: str, disk: DiskSpec) -> None:
        self.run("detach_disk", [domain, disk.source, disk.target, str(disk.index)])

    def attach_nic(self, domain: str, nic: NicSpec) -> None:
        args = [domain, nic.mac, nic.bridge or "-", nic.model, "-", nic.target or "-"]
        self.run("attach_nic", args)

    def detach_nic(self, domain: str, mac: str) -> None:
        self.run("detach_nic", [domain, mac])

    def resize_disk(self, domain: str, target: str, size: int) -> None:
        self.run("resize_disk", [domain, target, str(size)])

    def migrate(
        self,
        domain: str,
        dest_uri: str,
        *,
        live: bool,
        copy_storage: bool = False,
        bandwidth_mib: int = 0,
        progress: Progress | None = None,
    ) -> Migration:
        """``migrate DOMAIN DESTINATION_HOST HOST DEST_URI LIVE COPY_STORAGE BANDWIDTH_MIB``, run
        once (a migration is not retried); a cancel (``progress`` raising) interrupts the script,
        whose virsh then aborts the migration. A script that still ends well had switched over
        (too late to abort): the migration stands and is returned, as the native driver does."""
        dest = urlsplit(dest_uri).hostname or "localhost"
        yes = {True: "yes", False: "no"}
        args = [domain, dest, self.host_arg, dest_uri, yes[live], yes[copy_storage]]
        argv = self._argv("migrate", [*args, str(int(bandwidth_mib))])
        t0 = time.monotonic()
        with self._slot():
            proc = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,  # a cancel interrupts the script and its virsh
            )
            try:
                while True:
                    try:
                        out, err = proc.communicate(timeout=0.5)
                        break
                    except subprocess.TimeoutExpired:
                        if time.monotonic() - t0 > self.timeout:
                            raise VmmError(
                                "exec", "migrate", f"no answer within {self.timeout:.0f} s"
                            ) from None
                        if progress is not None:
                            progress(0, 0)
            except BaseException:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGINT)
                out, err = proc.communicate()
                if proc.returncode != 0:
                    raise
                # too late: it had switched over; the migration stands
        if proc.returncode != 0:
            raise VmmError(
                "exec", "migrate", err.strip() or out.strip() or f"exit {proc.returncode}"
            )
        record = parse_poll(out)
        return Migration(
            checkpoints=tuple(record.get("CHECKPOINTS", "").split()),
            chain_break=record.get("CHAIN_BREAK", ""),
            live=live,
            total_ms=int((time.monotonic() - t0) * 1000),
        )
