#!/bin/busybox sh
# /init of the vmkeep test-lab guest: busybox, virtio drivers, ext4 data disks, qemu-guest-agent.
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mkdir -p /proc /sys /dev /run /tmp /mnt /var
ln -s /run /var/run
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /etc/vmkeep-modules); do insmod "/lib/modules/$m.ko" 2>/dev/null; done
# Data disks: every /dev/vdX holding ext4 is mounted at /mnt/vdX. noinit_itable keeps ext4's
# background inode-table zeroing from dirtying blocks (it would distort incremental sizes).
sleep 0.2
for dev in /dev/vd?; do
  [ -b "$dev" ] || continue
  name=${dev#/dev/}
  mkdir -p "/mnt/$name"
  mount -t ext4 -o noinit_itable "$dev" "/mnt/$name" && echo "VMKEEP-LAB-MOUNTED $name"
done
# The guest's own "production" set-up lives on its first data disk, so it travels with a
# backup: /mnt/vda/vmkeep-rc (e.g. an address on eth0 and a service), bounded to 60 s.
if [ -f /mnt/vda/vmkeep-rc ]; then
  timeout 60 sh /mnt/vda/vmkeep-rc > /run/vmkeep-rc.log 2>&1
  echo "VMKEEP-LAB-RC $?"
fi
# qemu-ga's guest-shutdown runs /sbin/shutdown, which busybox lacks: power off through ACPI.
printf '#!/bin/sh\nsync\nexec /bin/busybox poweroff -f\n' > /sbin/shutdown
chmod 755 /sbin/shutdown
port=""
for p in /sys/class/virtio-ports/*; do
  [ "$(cat "$p/name" 2>/dev/null)" = "org.qemu.guest_agent.0" ] && port=${p##*/}
done
if grep -q vmkeep.noagent /proc/cmdline; then
  echo "VMKEEP-LAB-NOAGENT"
elif [ -n "$port" ]; then
  /usr/sbin/qemu-ga -m virtio-serial -p "/dev/$port" -d -t /run -f /run/qemu-ga.pid \
    && echo "VMKEEP-LAB-AGENT $port"
fi
echo "VMKEEP-LAB-READY"
while true; do sleep 3600; done
