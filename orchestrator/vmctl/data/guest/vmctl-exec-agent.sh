#!/bin/sh
# vmctl exec agent: runs the host's commands, one at a time, framed on a
# virtio-serial port. Shared by the micro image (busybox sh) and the NixOS
# guest (bash + coreutils); see docs/guest-contract.md, "Exec channel".
#
# Usage: vmctl-exec-agent.sh PORT [READY_FILE]
#   PORT        the org.vmctl.exec port (/dev/vportNpM or /dev/virtio-ports/org.vmctl.exec)
#   READY_FILE  touched once the port is open (the guest prints VMCTL-READY after it)
#
# Start it as the `agent` user: it never switches user itself, so a request
# costs one base64 decode and one `sh -c`, nothing more.
#
# Request (host -> guest), one per line:  <id> <base64 of a shell command>
# Reply (guest -> host):  \036VMCTL-BEGIN <id>\n  <stdout+stderr, raw>  \n\036VMCTL-END <id> <status>\n
set -u

port=${1:?usage: vmctl-exec-agent.sh PORT [READY_FILE]}
ready=${2:-}
RS=$(printf '\036')

# Environment every command sees: /etc/vmctl/env (KEY=VALUE lines taken
# literally, no shell expansion), then the fixed identity of `agent`.
if [ -r /etc/vmctl/env ]; then
    while IFS= read -r line || [ -n "$line" ]; do
        case $line in
            [A-Za-z_]*=*)
                key=${line%%=*}
                case $key in *[!A-Za-z0-9_]*) continue ;; esac
                export "$line"
                ;;
        esac
    done </etc/vmctl/env
fi
export HOME=/home/agent USER=agent LOGNAME=agent SHELL=/bin/sh

# Work in the workspace when it is mounted, else in the home folder.
workdir=$HOME
if grep -qs ' /workspace ' /proc/mounts; then
    workdir=/workspace
fi
cd "$workdir" || cd / || exit 1

exec 3<>"$port" || exit 1
if [ -n "$ready" ]; then
    : >"$ready"
fi

# read() on the port returns EOF while no host client is connected (a
# socket chardev between clients): wait and read on, never exit. vmctl's
# own pipe chardev stays connected, so this costs nothing there.
next_request() {
    while :; do
        if IFS= read -r req <&3 || [ -n "$req" ]; then
            return 0
        fi
        usleep 50000 2>/dev/null || sleep 1
    done
}

while next_request; do
    req=${req%"$(printf '\r')"}
    id=${req%% *}
    b64=${req#* }
    # Ids are 8-32 letters or digits; anything else cannot be answered.
    case $id in
        "" | *[!A-Za-z0-9]*) continue ;;
    esac
    [ ${#id} -ge 8 ] && [ ${#id} -le 32 ] || continue
    printf '%sVMCTL-BEGIN %s\n' "$RS" "$id" >&3
    case $b64 in
        "$req" | "") b64= ;;
        *[!A-Za-z0-9+/=]*) b64=! ;;
    esac
    if [ -z "$b64" ]; then
        printf 'vmctl-exec-agent: request has no command\n' >&3
        status=126
    elif [ "$b64" != ! ] && cmd=$(printf '%s' "$b64" | base64 -d 2>/dev/null); then
        sh -c "$cmd" </dev/null >&3 2>&1 3>&-
        status=$?
    else
        printf 'vmctl-exec-agent: command is not valid base64\n' >&3
        status=126
    fi
    printf '\n%sVMCTL-END %s %s\n' "$RS" "$id" "$status" >&3
done
