#!/bin/sh
# PID 1 of the savestate.qemu test guest.
#
# Kernel command line knobs:
#   fill=N   fill N MiB of RAM (a tmpfs) with random data before READY
#   disk=1   write the heartbeat counter to the first virtio disk (/dev/vda) too
#   agent=1  run the QEMU guest agent on the virtio-serial port org.qemu.guest_agent.0,
#            and report the guest's clock
#
# The heartbeat is "tick N" on the console every 100 ms. A guest restored from a
# save image continues its count; a rebooted one starts again at 1. With agent=1,
# every fifth tick is followed by "clock SECONDS.MICROSECONDS", the guest's
# system clock (UTC) as it printed the line.

/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

fill=0
disk=0
agent=0
read -r cmdline < /proc/cmdline
# shellcheck disable=SC2086 # split the command line into words on purpose
for arg in $cmdline; do
    case "$arg" in
        fill=*) fill="${arg#fill=}" ;;
        disk=*) disk="${arg#disk=}" ;;
        agent=*) agent="${arg#agent=}" ;;
    esac
done

if [ "$fill" -gt 0 ]; then
    mkdir -p /fill
    mount -t tmpfs -o "size=${fill}m" tmpfs /fill
    dd if=/dev/urandom of=/fill/random bs=1M count="$fill" 2>/dev/null
    echo "filled ${fill} MiB"
fi

if [ "$disk" = 1 ] || [ "$agent" = 1 ]; then
    # modules.order lists the virtio modules in dependency order.
    while read -r module; do
        insmod "/lib/modules/$module"
    done < /lib/modules/modules.order
fi
if [ "$disk" = 1 ]; then
    while [ ! -b /dev/vda ]; do sleep 0.1; done
fi

# The agent's port by its name (no udev here to make /dev/virtio-ports/NAME); up to 5 s.
agent_port() {
    for _ in $(seq 50); do
        for port in /sys/class/virtio-ports/*; do
            if [ "$(cat "$port/name" 2>/dev/null)" = org.qemu.guest_agent.0 ] && [ -c "/dev/${port##*/}" ]; then
                echo "/dev/${port##*/}"
                return 0
            fi
        done
        sleep 0.1
    done
    return 1
}

if [ "$agent" = 1 ]; then
    if port=$(agent_port); then
        qemu-ga -m virtio-serial -p "$port" -f /run/qemu-ga.pid -t /run </dev/null >/dev/null 2>&1 &
        echo "agent on $port"
    else
        echo "agent: no port org.qemu.guest_agent.0"
    fi
fi

# The clock to the microsecond (busybox's date has no %N).
clock() {
    adjtimex | awk '/tv_sec/ { s = $2 } /tv_usec/ { u = $2 } END { printf "clock %d.%06d\n", s, u }'
}

echo READY
i=0
while :; do
    i=$((i + 1))
    echo "tick $i"
    if [ "$agent" = 1 ] && [ $((i % 5)) = 0 ]; then
        clock
    fi
    if [ "$disk" = 1 ]; then
        printf 'tick %s\n' "$i" | dd of=/dev/vda conv=notrunc,fsync 2>/dev/null
    fi
    sleep 0.1
done
