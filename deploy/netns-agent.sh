#!/usr/bin/env bash
# The launch agent of deploy/netns-cluster.sh: Open MPI calls it instead of ssh
# (--mca plm_rsh_agent), as `netns-agent.sh [ssh-style options] HOST COMMAND...`, to start its
# daemon on HOST. HOST is a namespace address 10.77.C.(10+I) (or the namespace's name); the agent
# runs COMMAND with `sh -c` inside network namespace qtrain-hI (qtrainC-hI for cluster id C > 0)
# and a UTS namespace of its own whose hostname is that name, so each rank sees its own network
# and host name. Run as root.
set -euo pipefail

while [ $# -gt 0 ]; do
  case "$1" in
    -l|-p|-o|-i|-F) shift 2 ;;  # ssh options with a value (none are needed here)
    -*) shift ;;
    *) break ;;
  esac
done
[ $# -ge 2 ] || { echo "netns-agent.sh: usage: netns-agent.sh HOST COMMAND..." >&2; exit 255; }
host=$1
shift
if [[ "$host" =~ ^10\.77\.([0-9]+)\.([0-9]+)$ ]] && [ "${BASH_REMATCH[2]}" -ge 11 ]; then
  cluster=${BASH_REMATCH[1]}
  i=$((BASH_REMATCH[2] - 10))
  if [ "$cluster" -eq 0 ]; then ns=qtrain-h$i; else ns=qtrain$cluster-h$i; fi
elif [[ "$host" =~ ^qtrain[0-9]*-h[0-9]+$ ]]; then
  ns=$host
else
  echo "netns-agent.sh: unknown host '$host' (want 10.77.C.(10+I) or qtrain[C]-hI)" >&2
  exit 255
fi
[ -e "/run/netns/$ns" ] ||
  { echo "netns-agent.sh: no namespace $ns for host $host (is the cluster up?)" >&2; exit 255; }
# Like ssh: the words of COMMAND are joined with spaces and run by a shell on the "remote" side.
exec ip netns exec "$ns" unshare --uts -- sh -c "hostname $ns && exec sh -c \"\$0\"" "$*"
