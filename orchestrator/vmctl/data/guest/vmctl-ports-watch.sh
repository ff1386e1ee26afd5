#!/bin/sh
# vmctl-ports-watch.sh DEVICE POLL_S HEARTBEAT_POLLS MAX_PORTS
#
# Tells the host which TCP ports this guest listens on, on any address but
# its own loopback, so vmctl can mirror them on the host's 127.0.0.1 (the
# `mirror` section of guest-contract.json). One line per report,
# `ports P1 P2 ...` (decimal, possibly none), written to the virtio-serial
# port DEVICE whenever the set changes and every HEARTBEAT_POLLS polls.
# busybox ash and bash alike, with no fork per poll: forks are what cost
# under TCG (a `$(cat ...)` per poll is 10x the whole scan).
dev=$1 poll=${2:-0.25} beat=${3:-20} max=${4:-64}

# Wait POLL_S without forking `sleep`: `read -t` on a FIFO nobody writes.
tick=
if (read -r -t 0 _ </dev/null) 2>/dev/null || [ $? -eq 1 ]; then
    tick=$(mktemp -u "${TMPDIR:-/tmp}/vmctl-ports.XXXXXX") && mkfifo -m 600 "$tick" &&
        exec 4<>"$tick" && rm -f "$tick" || tick=
fi
nap() {
    if [ -n "$tick" ]; then read -r -t "$poll" _ <&4; else sleep "$poll"; fi
}

scan() {
    cur= n=0
    for f in /proc/net/tcp /proc/net/tcp6; do
        [ -r "$f" ] || continue
        while read -r sl local _ st _; do
            [ "$sl" = sl ] && continue # the header
            # The kernel lists listening sockets first: stop at the first other one.
            [ "$st" = 0A ] || break
            case ${local%:*} in
                # 127.0.0.0/8, ::1 and ::ffff:127.0.0.0/104 (little-endian hex)
                ??????7F | 00000000000000000000000001000000 | 0000000000000000FFFF0000??????7F) continue ;;
            esac
            p=$((0x${local#*:}))
            case " $cur " in *" $p "*) continue ;; esac
            [ "$n" -lt "$max" ] || return 0
            cur="$cur $p" n=$((n + 1))
        done <"$f"
    done
}

exec 3>"$dev" || { sleep 1; exit 1; }
last=none i=0
while :; do
    scan
    if [ "$cur" != "$last" ] || [ "$i" -ge "$beat" ]; then
        echo "ports$cur" >&3 || { sleep 1; exit 1; }
        last=$cur i=0
    fi
    i=$((i + 1))
    nap
done
