"""Protected restore points on a real guest: retention passes a protected chain by, `backups
delete` refuses it until an admin forces it, and the protected point still restores the bytes
it was taken with."""

from __future__ import annotations

import hashlib
from pathlib import Path

from vmkeep.hypervisor import Hypervisor
from vmkeep.lab import Lab
from vmkeep.lab.lab import read_file_from_image


def test_a_protected_point_survives_retention_and_delete(
    vmkeep, lab: Lab, hv: Hypervisor, agent_vm: str, qemu_reachable_data_dir: Path, tmp_path: Path
) -> None:
    vm = agent_vm
    for cp in hv.checkpoints(vm):
        hv.delete_checkpoint(vm, cp)
    vmkeep("vm", "import", vm)
    vmkeep(
        "datastore", "add", "ds", "--driver", "dir", "--path", str(qemu_reachable_data_dir / "ds")
    )
    vmkeep("vm", "config", vm, "--mode", "full", "--keep-last", "1")
    digests, ids = [], []
    for i in range(3):
        digests.append(lab.write_random(vm, "/mnt/vda/protected", 1 + i))
        ids.append(vmkeep("backup", vm, "-d", "ds", "--json").json()["id"])
        if i == 0:
            shown = vmkeep("backups", "protect", str(ids[0]), "--json").json()
            assert (shown["backup"], shown["increment"], shown["protected"]) == (ids[0], 0, True)
            vmkeep("backups", "note", str(ids[0]), "before the upgrade")
    kept = [b["id"] for b in vmkeep("backups", "list", "--vm", vm, "--json").json()]
    assert kept == [ids[0], ids[2]]  # keep_last 1, and the protected chain passed by
    point = vmkeep("backups", "show", str(ids[0]), "--json").json()["increments"][0]
    assert (point["protected"], point["note"]) == (True, "before the upgrade")

    refused = vmkeep("backups", "delete", str(ids[0]), check=25)
    assert "protected" in refused.err and "unprotect" in refused.err, refused.err
    out = tmp_path / "p.qcow2"
    vmkeep("restore", str(ids[0]), "--disk", "vda", "--path", str(out))
    data = read_file_from_image(out, "/protected", tmp_path)
    assert hashlib.sha256(data).hexdigest() == digests[0]
    vmkeep("backups", "delete", str(ids[0]), "--force")
    assert [b["id"] for b in vmkeep("backups", "list", "--vm", vm, "--json").json()] == [ids[2]]
