#!/bin/busybox sh
# pinnace initramfs: load the modules the root disk needs, mount it, hand over to the agent.
# Every busybox call is a fork and exec, which costs ~15 ms under TCG: so modules load
# with one modprobe, and the new root's mounts come from one fstab.
# Kernel command line words read here:
#   pinnace.probe=1   print a marker and power off at once (the accelerator probe)
#   init=PATH         run PATH instead of the agent after switch_root (args after "--" follow)
bb=/bin/busybox
$bb mount -t proc proc /proc
read -r cmdline < /proc/cmdline
case " $cmdline " in
*" pinnace.probe=1 "*)
    echo "PINNACE-PROBE-OK"
    $bb poweroff -f
    ;;
esac
read -r up _ < /proc/uptime
echo "pinnace-init: start at $up s"
$bb mount -a -T /etc/fstab.early
read -r modules < /etc/modules.boot
$bb modprobe -a $modules || echo "pinnace-init: some modules failed to load"
for dev in /sys/bus/pci/devices/*; do
    if [ -e "$dev" ]; then
        read -r modules < /etc/modules.pci
        $bb modprobe -a $modules
    fi
    break
done
$bb mkdir -p /dev/pts /dev/shm

init=""
for word in $cmdline; do
    case "$word" in
    init=*) init="${word#init=}" ;;
    esac
done

i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1))
    if [ $i -gt 500 ]; then
        echo "pinnace-init: no root disk /dev/vda after 5 s"
        $bb ls /sys/bus/virtio/devices
        exec $bb sh
    fi
    $bb usleep 10000
done
if ! $bb mount -t ext4 -o rw,noatime /dev/vda /newroot; then
    echo "pinnace-init: cannot mount the root disk /dev/vda"
    exec $bb sh
fi
$bb mount -a -T /etc/fstab.newroot
read -r up _ < /proc/uptime
echo "pinnace-init: root mounted at $up s"
$bb umount /sys /dev /proc
if [ -n "$init" ]; then
    exec $bb switch_root /newroot "$init" "$@"
fi
exec $bb switch_root /newroot /usr/bin/python3 -I -S /usr/lib/pinnace/agent
