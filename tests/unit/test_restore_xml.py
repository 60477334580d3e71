from pathlib import Path

from vmkeep.engine.restore.point import rewrite_domain_xml
from vmkeep.model import Warnings

SRC = """<domain type='qemu'>
  <name>web</name>
  <uuid>11111111-2222-3333-4444-555555555555</uuid>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/images/web.qcow2'/>
      <backingStore type='file'><format type='qcow2'/><source file='/b.qcow2'/></backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/var/lib/images/scratch.raw'/>
      <target dev='vdb' bus='virtio'/>
      <transient/>
    </disk>
    <disk type='file' device='cdrom'><target dev='hdc' bus='ide'/></disk>
    <interface type='network'>
      <mac address='52:54:00:aa:bb:cc'/>
      <source network='default'/>
      <ip address='192.0.2.10' prefix='24'/>
      <model type='virtio'/>
    </interface>
    <serial type='file'><source path='/var/log/web/serial.log'/><target port='0'/></serial>
  </devices>
</domain>"""


def _rewrite(**kw: bool) -> tuple[str, Warnings]:
    w = Warnings()
    out = rewrite_domain_xml(
        SRC,
        "web-r",
        {"vda": Path("/r/vda.qcow2")},
        Path("/r"),
        no_nic=kw.get("no_nic", False),
        no_ip=kw.get("no_ip", False),
        warnings=w,
    )
    return out, w


def test_new_identity_disks_and_chardevs() -> None:
    out, w = _rewrite()
    assert "<name>web-r</name>" in out and "<uuid>" not in out
    assert "/r/vda.qcow2" in out and "/var/lib/images/web.qcow2" not in out
    assert "backingStore" not in out
    assert "scratch.raw" not in out and any("vdb" in m for m in w.items)
    assert 'device="cdrom"' in out  # non-disk devices stay
    assert "/r/serial.log" in out
    assert "52:54:00:aa:bb:cc" in out and "192.0.2.10" in out  # NICs kept by default


def test_no_ip_keeps_nic_drops_mac_and_address() -> None:
    out, _ = _rewrite(no_ip=True)
    assert "<interface" in out and "default" in out
    assert "52:54:00:aa:bb:cc" not in out and "192.0.2.10" not in out


def test_no_nic_drops_interfaces() -> None:
    out, _ = _rewrite(no_nic=True)
    assert "<interface" not in out
