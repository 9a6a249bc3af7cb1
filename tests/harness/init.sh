#!/bin/sh
# PID 1 of the savestate.qemu test guest.
#
# Kernel command line knobs:
#   fill=N   fill N MiB of RAM (a tmpfs) with random data before READY
#   disk=1   write the heartbeat counter to the first virtio disk (/dev/vda) too
#
# The heartbeat is "tick N" on the console every 100 ms. A guest restored from a
# save image continues its count; a rebooted one starts again at 1.

/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

fill=0
disk=0
read -r cmdline < /proc/cmdline
# shellcheck disable=SC2086 # split the command line into words on purpose
for arg in $cmdline; do
    case "$arg" in
        fill=*) fill="${arg#fill=}" ;;
        disk=*) disk="${arg#disk=}" ;;
    esac
done

if [ "$fill" -gt 0 ]; then
    mkdir -p /fill
    mount -t tmpfs -o "size=${fill}m" tmpfs /fill
    dd if=/dev/urandom of=/fill/random bs=1M count="$fill" 2>/dev/null
    echo "filled ${fill} MiB"
fi

if [ "$disk" = 1 ]; then
    # modules.order lists the virtio modules in dependency order.
    while read -r module; do
        insmod "/lib/modules/$module"
    done < /lib/modules/modules.order
    while [ ! -b /dev/vda ]; do sleep 0.1; done
fi

echo READY
i=0
while :; do
    i=$((i + 1))
    echo "tick $i"
    if [ "$disk" = 1 ]; then
        printf 'tick %s\n' "$i" | dd of=/dev/vda conv=notrunc,fsync 2>/dev/null
    fi
    sleep 0.1
done
