#!/bin/sh
# vmctl exec agent: sets up the environment every session sees, then hands
# the exec ports to vmctl-exec-mux, which runs the host's commands (stdin,
# stdout, stderr, exit status, optional pty; one session per port). Shared
# by the micro image (busybox sh) and the NixOS guest (bash + coreutils);
# see docs/guest-contract.md, "Exec channel".
#
# Usage: vmctl-exec-agent.sh READY_FILE PORT...
#   READY_FILE  touched once every port is open (the guest prints VMCTL-READY
#               after it); a positional argument, as busybox su parses options
#   PORT        an org.vmctl.exec.N port (/dev/vportNpM or /dev/virtio-ports/org.vmctl.exec.N)
# The mux is $VMCTL_EXEC_MUX, else vmctl-exec-mux next to this script.
#
# Start it as the `agent` user: it never switches user itself, so a request
# costs one fork and one `sh -c`, nothing more.
set -u
ready=${1:?usage: vmctl-exec-agent.sh READY_FILE PORT...}
shift

# Builtins only on the way to the ready file: each process costs ~16 ms under TCG.
case $0 in */*) here=${0%/*} ;; *) here=. ;; esac
mux=${VMCTL_EXEC_MUX:-$here/vmctl-exec-mux}
unset VMCTL_EXEC_MUX

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
while read -r _ mnt _; do
    [ "$mnt" = /workspace ] && { workdir=/workspace; break; }
done </proc/mounts
cd "$workdir" || cd / || exit 1

exec "$mux" -r "$ready" "$@"
