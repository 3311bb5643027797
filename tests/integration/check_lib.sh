# Shared by the integration scripts (source it): a `check` that runs one command and matches its
# exit status and output, counting passes and failures, and `finish`, the scripts' last line.
#
#   check <name> <expected exit: a number, or "fail" for any non-zero but 124> <regex> -- command...
#
# The regex (grep -E) is matched against the whole output joined into one line; the output of
# the last check stays in $last_output.
passed=0
failed=0
last_output=

check() {
  local name=$1 want=$2 pattern=$3
  shift 4
  local out rc ok=0 start=$SECONDS
  out=$("$@" 2>&1)
  rc=$?
  if [ "$want" = fail ]; then
    [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && ok=1
  else
    [ "$rc" -eq "$want" ] && ok=1
  fi
  if [ "$ok" -eq 1 ] && grep -Eq -- "$pattern" <<<"$(tr '\n' ' ' <<<"$out")"; then
    passed=$((passed + 1))
    echo "ok   $name ($((SECONDS - start)) s)"
  else
    failed=$((failed + 1))
    echo "FAIL $name: exit $rc (want $want), output did not match /$pattern/:"
    tail -n 12 <<<"$out"
  fi
  last_output=$out
}

# require_netns <test name>: exits 77 (ctest: skipped) unless this runs as root with a working
# `ip netns`, and 1 unless Fashion-MNIST is installed.
require_netns() {
  local probe=qtrain-probe-$$ err
  if [ "$(id -u)" -ne 0 ]; then
    echo "SKIP: $1 needs root to create network namespaces (running as uid $(id -u))"
    exit 77
  fi
  if ! command -v ip >/dev/null; then
    echo "SKIP: the 'ip' command (iproute2) is missing"
    exit 77
  fi
  if ! err=$(ip netns add "$probe" 2>&1) || ! ip netns exec "$probe" true 2>/dev/null; then
    ip netns del "$probe" 2>/dev/null
    echo "SKIP: 'ip netns' is not permitted here (an unprivileged container?): ${err:-exec failed}"
    exit 77
  fi
  ip netns del "$probe"
  if [ ! -d /usr/share/datasets/fashion-mnist ]; then
    echo "fashion-mnist is not installed at /usr/share/datasets/fashion-mnist (deploy/install-deps.sh installs it)"
    exit 1
  fi
}

finish() {
  echo "$passed passed, $failed failed"
  [ "$failed" -eq 0 ]
}
