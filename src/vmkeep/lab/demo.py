"""``vmkeep lab demo``: the README's main job, on real libvirt/QEMU and the embedded defaults.

Boots a lab VM, imports it, writes data in the guest, freezes and thaws it through the agent.
"""

from __future__ import annotations

from collections.abc import Callable

from vmkeep.engine import vms
from vmkeep.engine.context import Context
from vmkeep.lab.lab import Lab

DEMO_PREFIX = "vmkeep-demo-"


def run_demo(ctx: Context, say: Callable[[str], None]) -> None:
    lab = Lab(ctx.hv, ctx.config.lab.dir, prefix=DEMO_PREFIX)
    say(f"catalog: {ctx.catalog.display_url}")
    lab.down()
    name = f"{DEMO_PREFIX}1"
    say(f"booting lab VM {name} (TCG, qemu-guest-agent, 256 MiB ext4 data disk) ...")
    lab.create(name, [256 << 20])
    vms.import_vm(ctx, name)
    say(f"imported {name}: {vms.show_vm(ctx, name)['lcm_state']}")
    digest = lab.write_random(name, "/mnt/vda/demo.bin", 8)
    say(f"wrote 8 MiB in the guest: sha256 {digest}")
    vms.quiesce(ctx, name)
    say(f"quiesced: guest agent reports '{ctx.hv.fs_freeze_status(name, 10)}'")
    vms.unquiesce(ctx, name)
    say(f"unquiesced: guest agent reports '{ctx.hv.fs_freeze_status(name, 10)}'")
    say(f"demo VM left running; remove it with 'vmkeep lab down --prefix {DEMO_PREFIX}'")
