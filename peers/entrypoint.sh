#!/bin/bash
# Container entrypoint for `p2pfm peer`: picks this container's work folder, finds the
# swarm, turns P2PFM_* environment variables into flags, then execs the daemon (which
# keeps the process id, so `docker stop` -> SIGINT -> the daemon's graceful leave).
#
#   p2pfm-entrypoint [ARGS...]   run `p2pfm peer ... ARGS` (the default)
#   p2pfm-entrypoint health      exit 0 while the daemon keeps rewriting status.json
#
# Environment, all optional:
#   P2PFM_WORK_DIR        key, checkpoints, metrics.jsonl, status.json. Unset: claim a slot
#                         $P2PFM_DATA/slot-N (flock), so the replicas of a scaled service
#                         share one named volume without sharing a key; a stopped and
#                         restarted container takes its own slot back (same container id).
#   P2PFM_DATA            parent folder of the slots (default /data)
#   P2PFM_KEY             key file (default WORK_DIR/peer.key; the daemon creates it, 0600)
#   P2PFM_INITIAL_PEERS   multiaddrs to join, separated by spaces or commas; when set, the
#                         bootstrap files below are not read
#   P2PFM_BOOTSTRAP_FILE  status.json of the peer to join (the first peer's volume mounted
#                         read-only). Set: wait (P2PFM_BOOTSTRAP_TIMEOUT s, 300) until it or
#                         a P2PFM_BOOTSTRAP_GLOB file shows a live peer.
#   P2PFM_BOOTSTRAP_HOST  with P2PFM_BOOTSTRAP_PORT (7000): reach that peer at
#                         /ip4/<host's IPv4>/tcp/<port>/p2p/<its libp2p_id>, not at the
#                         addresses its file lists (its own interfaces)
#   P2PFM_BOOTSTRAP_GLOB  other peers' status.json files (patterns, space separated): every
#                         live one is joined too, so a restarted peer finds the swarm even
#                         while the first peer is away. Without P2PFM_BOOTSTRAP_FILE nothing
#                         is waited for: no live peer means start a new swarm.
#   P2PFM_BOOTSTRAP_MAX_AGE  a status.json older than this (s, 300) or saying "left" is
#                         not a live peer
#   P2PFM_AUTHORITY_KEY   the swarm authority's key file (a volume every peer mounts): unless
#                         P2PFM_CERT or P2PFM_OPEN=true is set, made once (flock) if missing,
#                         and this peer's key is certified with it (WORK_DIR/peer.cert) and
#                         run with --authority/--cert. One host's Compose swarm only: across
#                         machines keep the authority key off the peers (p2pfm admit, P2PFM_CERT)
#   P2PFM_CONFIG          a TOML file -> --config
#   P2PFM_EXTRA_ARGS      words appended to the command line
#   P2PFM_HEALTH_MAX_AGE  seconds status.json may stay unchanged while healthy (600)
#   P2PFM_<NAME>=VALUE    any other one -> --<name> VALUE (lowercase, '_' -> '-');
#                         VALUE "true" -> a bare --<name>; "false" or empty -> nothing
set -euo pipefail

log() { echo "p2pfm-entrypoint: $*" >&2; }
die() { log "error: $*"; exit 2; }

# Where `health` finds the work dir this run chose (overridable for the entrypoint's tests).
WORK_DIR_NOTE=${P2PFM_WORK_DIR_NOTE:-/tmp/p2pfm-work-dir}

health() {
    local work status age max=${P2PFM_HEALTH_MAX_AGE:-600}
    work=$(cat "$WORK_DIR_NOTE" 2>/dev/null) || { echo "no work dir yet"; exit 1; }
    status="$work/status.json"
    [ -s "$status" ] || { echo "no $status yet"; exit 1; }
    age=$(( $(date +%s) - $(stat -c %Y "$status") ))
    if [ "$age" -gt "$max" ]; then echo "$status unchanged for ${age}s"; exit 1; fi
    echo "ok: $status updated ${age}s ago"
}

# Take slot folder $1 if no running container holds its lock; the lock (fd 9) stays held
# by the daemon after exec and is released when the container stops.
try_slot() {
    mkdir -p "$1"
    exec 9>"$1/.lock"
    flock -n 9
}

# Who this container is, stable across stop/start: its container id (found in the
# source path of the /etc/hostname mount; with host networking every container has the
# host's hostname), else the hostname.
container_name() {
    local id
    id=$(grep -oE '/containers/[0-9a-f]{64}/' /proc/self/mountinfo 2>/dev/null | head -n 1 | cut -d/ -f3)
    echo "${id:-$(hostname)}"
}

# Set $work to this container's slot: the one it owned before, else the first free one.
claim_slot() {
    local data=$1 me slot i=0
    me=$(container_name)
    for slot in "$data"/slot-*; do
        if [ -f "$slot/owner" ] && [ "$(cat "$slot/owner")" = "$me" ] && try_slot "$slot"; then
            work=$slot
            return 0
        fi
    done
    while :; do
        slot="$data/slot-$i"
        if try_slot "$slot"; then
            echo "$me" >"$slot/owner"
            work=$slot
            return 0
        fi
        i=$((i + 1))
    done
}

# Print the multiaddrs of live peers found in the bootstrap files, one a line; exit 1 if
# P2PFM_BOOTSTRAP_FILE is set and no live peer was found (the caller waits and retries).
find_live_peers() {
    python3 - "$work" "${P2PFM_BOOTSTRAP_FILE:-}" "${1:-}" "${P2PFM_BOOTSTRAP_PORT:-7000}" \
        "${P2PFM_BOOTSTRAP_MAX_AGE:-300}" "${P2PFM_BOOTSTRAP_GLOB:-}" <<'EOF'
import glob, json, os, sys, time
work, required, ip, port, max_age, patterns = sys.argv[1:]

def live(path):
    try:
        status = json.loads(open(path).read())
        age = time.time() - os.stat(path).st_mtime
    except (OSError, ValueError):
        return None
    if status.get("state") == "left" or not status.get("libp2p_id") or age > float(max_age):
        return None
    return status

addrs = []
first = live(required) if required else None
if first and ip:
    # libp2p_id, not peer_id: the /p2p/ part of an address names the libp2p identity.
    addrs.append(f"/ip4/{ip}/tcp/{port}/p2p/{first['libp2p_id']}")
elif first:
    addrs += first.get("maddrs") or []
for pattern in patterns.split():
    for path in sorted(glob.glob(pattern)):
        if os.path.realpath(os.path.dirname(path)) == os.path.realpath(work):
            continue  # our own status from an earlier run
        status = live(path)
        if status:
            addrs += status.get("maddrs") or []
for addr in dict.fromkeys(addrs):
    print(addr)
sys.exit(1 if required and not addrs else 0)
EOF
}

# Resolve P2PFM_BOOTSTRAP_HOST (if set), then wait for find_live_peers to succeed.
bootstrap_addrs() {
    local timeout=${P2PFM_BOOTSTRAP_TIMEOUT:-300} host=${P2PFM_BOOTSTRAP_HOST:-} ip=""
    local deadline=$(( $(date +%s) + timeout ))
    if [ -n "$host" ]; then
        until ip=$(getent ahostsv4 "$host" | awk 'NR == 1 { print $1 }') && [ -n "$ip" ]; do
            [ "$(date +%s)" -lt "$deadline" ] || die "cannot resolve $host after ${timeout}s"
            sleep 1
        done
    fi
    until find_live_peers "$ip"; do
        [ "$(date +%s)" -lt "$deadline" ] || die "no live peer in the bootstrap files after ${timeout}s"
        sleep 1
    done
}

if [ "${1:-}" = health ]; then health; exit; fi

if [ -n "${P2PFM_WORK_DIR:-}" ]; then
    work=$P2PFM_WORK_DIR
    mkdir -p "$work"
else
    claim_slot "${P2PFM_DATA:-/data}"
fi
echo "$work" >"$WORK_DIR_NOTE"

key=${P2PFM_KEY:-$work/peer.key}
args=(peer --key "$key" --work-dir "$work")
if [ -n "${P2PFM_AUTHORITY_KEY:-}" ] && [ -z "${P2PFM_CERT:-}" ] && [ "${P2PFM_OPEN:-}" != true ]; then
    mkdir -p "$(dirname "$P2PFM_AUTHORITY_KEY")"
    (
        flock 8
        [ -f "$P2PFM_AUTHORITY_KEY" ] || p2pfm keygen --out "$P2PFM_AUTHORITY_KEY" >/dev/null
    ) 8>"$(dirname "$P2PFM_AUTHORITY_KEY")/.lock"
    [ -f "$key" ] || p2pfm keygen --out "$key" >/dev/null
    p2pfm admit --authority "$P2PFM_AUTHORITY_KEY" --peer "$key" --run-id "${P2PFM_RUN_ID:-p2pfm-default}" \
        --out "$work/peer.cert" >/dev/null
    args+=(--authority "$(p2pfm id "$P2PFM_AUTHORITY_KEY")" --cert "$work/peer.cert")
    log "admitted by the swarm's authority ($P2PFM_AUTHORITY_KEY)"
fi
if [ -n "${P2PFM_CONFIG:-}" ]; then args+=(--config "$P2PFM_CONFIG"); fi

peers=()
if [ -n "${P2PFM_INITIAL_PEERS:-}" ]; then
    read -r -a peers <<<"${P2PFM_INITIAL_PEERS//,/ }"
elif [ -n "${P2PFM_BOOTSTRAP_FILE:-}${P2PFM_BOOTSTRAP_GLOB:-}" ]; then
    mapfile -t peers < <(bootstrap_addrs)
    if [ -n "${P2PFM_BOOTSTRAP_FILE:-}" ] && [ "${#peers[@]}" -eq 0 ]; then
        die "found no live peer to join"
    fi
fi
if [ "${#peers[@]}" -gt 0 ]; then
    args+=(--initial-peers "${peers[@]}")
else
    log "no live peer known: starting a new swarm"
fi

# Variables this script consumes itself; not daemon flags.
own=" AUTHORITY_KEY DATA WORK_DIR KEY INITIAL_PEERS BOOTSTRAP_FILE BOOTSTRAP_HOST BOOTSTRAP_PORT BOOTSTRAP_GLOB \
BOOTSTRAP_TIMEOUT BOOTSTRAP_MAX_AGE CONFIG EXTRA_ARGS HEALTH_MAX_AGE WORK_DIR_NOTE "
while IFS='=' read -r name value; do
    key=${name#P2PFM_}
    [[ "$own" == *" $key "* ]] && continue
    flag="--$(echo "$key" | tr 'A-Z_' 'a-z-')"
    case "$value" in
        true) args+=("$flag") ;;
        false | "") ;;
        *) args+=("$flag" "$value") ;;
    esac
done < <(env | grep -E '^P2PFM_[A-Z0-9_]+=' | sort)

if [ -n "${P2PFM_EXTRA_ARGS:-}" ]; then
    read -r -a extra <<<"$P2PFM_EXTRA_ARGS"
    args+=("${extra[@]}")
fi
args+=("$@")

log "work dir $work"
log "exec p2pfm ${args[*]}"
exec p2pfm "${args[@]}"
