#!/bin/busybox sh
# pinnace initramfs: load the modules the root disk needs, mount it, hand over to the agent.
# Kernel command line words read here:
#   pinnace.probe=1   print a marker and power off at once (the accelerator probe)
#   init=PATH         run PATH instead of the agent after switch_root (args after "--" follow)
bb=/bin/busybox
$bb mount -t proc proc /proc
case " $($bb cat /proc/cmdline) " in
*" pinnace.probe=1 "*)
    echo "PINNACE-PROBE-OK"
    $bb poweroff -f
    ;;
esac
$bb mount -t sysfs sysfs /sys
$bb mount -t devtmpfs devtmpfs /dev
while read -r mod; do
    $bb insmod "/lib/modules/$mod" || echo "pinnace-init: insmod $mod failed"
done < /lib/modules/load.order

init=""
for word in $($bb cat /proc/cmdline); do
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
$bb mkdir -p /newroot
if ! $bb mount -t ext4 -o rw,noatime /dev/vda /newroot; then
    echo "pinnace-init: cannot mount the root disk /dev/vda"
    exec $bb sh
fi
$bb mount --move /dev /newroot/dev
$bb umount /sys
$bb umount /proc
if [ -n "$init" ]; then
    exec $bb switch_root /newroot "$init" "$@"
fi
exec $bb switch_root /newroot /usr/bin/python3 -I -S /usr/lib/pinnace/agent
