#!/usr/bin/env bash
# The speed table of issue 11: shmdict's throughput as a ratio of the seqlock
# floor's, RwLock<HashMap>'s and LMDB's (one reused read transaction), each
# ratio taken within one criterion run of benches/peers.rs, then the median
# (and range) over the runs.
#
#   scripts/peers.sh [RUNS]            # runs the get and insert groups RUNS times (default 3)
#   scripts/peers.sh --report RUN...   # only prints the table from saved runs
#
# Each run is saved as $OUT/peers-run-N.json (OUT defaults to
# target/peers-runs): {"group/function": median ns}. The Redis rows run only
# if a server answers (see benches/redis.sh); they are not in this table.
# CARGO_TARGET_DIR is honoured; criterion's results are read from there.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}
out=${OUT:-$target/peers-runs}
mkdir -p "$out"

collect() { # criterion results -> one JSON file of medians
    python3 - "$target/criterion" "$1" <<'EOF'
import json, os, sys
root, dest = sys.argv[1], sys.argv[2]
medians = {}
for group in os.listdir(root):
    if not group.startswith("peers_"):
        continue
    for fn in os.listdir(os.path.join(root, group)):
        new = os.path.join(root, group, fn, "new")
        try:
            meta = json.load(open(os.path.join(new, "benchmark.json")))
            est = json.load(open(os.path.join(new, "estimates.json")))
        except OSError:
            continue
        medians[f'{meta["group_id"]}/{meta["function_id"]}'] = est["median"]["point_estimate"]
json.dump(medians, open(dest, "w"), indent=1, sort_keys=True)
EOF
}

report() {
    python3 - "$@" <<'EOF'
import json, statistics, sys
runs = [json.load(open(p)) for p in sys.argv[1:]]
# (label, group, shmdict function, [(peer function, target or None)])
rows = [
    ("`Reader::get` 64 B", "peers_get/64B", "shmdict_reader",
     [("seqlock_floor", 0.8), ("lmdb_txn", 3.0), ("rwlock_hashmap", None)]),
    ("`get_ref` 64 B", "peers_get/64B", "shmdict_ref",
     [("seqlock_floor", None), ("lmdb_txn", None), ("rwlock_hashmap", None)]),
    ("`get_into` 64 B", "peers_get/64B", "shmdict",
     [("seqlock_floor", 0.5), ("rwlock_hashmap", 1.5), ("lmdb_txn", None)]),
    ("overwrite `insert` 64 B", "peers_insert/64B", "shmdict",
     [("seqlock_floor", 0.5), ("rwlock_hashmap", 1.5), ("lmdb", None)]),
    ("`Reader::get` 1 KiB", "peers_get/1KiB", "shmdict_reader",
     [("rwlock_hashmap", None), ("dashmap", None), ("lmdb_txn", None)]),
    ("`get_ref` 1 KiB", "peers_get/1KiB", "shmdict_ref",
     [("rwlock_hashmap", None), ("dashmap", None), ("lmdb_txn", None)]),
    ("`get_into` 1 KiB", "peers_get/1KiB", "shmdict",
     [("rwlock_hashmap", None), ("dashmap", None), ("lmdb_txn", None)]),
    ("overwrite `insert` 1 KiB", "peers_insert/1KiB", "shmdict",
     [("rwlock_hashmap", None), ("dashmap", None), ("lmdb", None)]),
]
print(f"{len(runs)} run(s); ratio = shmdict's throughput / the peer's (peer ns / shmdict ns) "
      "within one run; median of the runs [min-max]; ns: median over runs\n")
print("| op | shmdict ns | vs peer (target): ratio | | |")
print("|---|---:|---|---|---|")
for label, group, me, peers in rows:
    mine = [r.get(f"{group}/{me}") for r in runs]
    if any(v is None for v in mine):
        continue
    cells = []
    for peer, target in peers:
        theirs = [r.get(f"{group}/{peer}") for r in runs]
        if any(v is None for v in theirs):
            cells.append(f"{peer}: -")
            continue
        ratios = [t / m for t, m in zip(theirs, mine)]
        med = statistics.median(ratios)
        spread = f" [{min(ratios):.2f}-{max(ratios):.2f}]" if len(ratios) > 1 else ""
        verdict = ""
        if target is not None:
            verdict = f" (>= {target}x: {'met' if med >= target else '**missed**'})"
        cells.append(f"{peer} {statistics.median(theirs):.0f} ns: {med:.2f}x{spread}{verdict}")
    print(f"| {label} | {statistics.median(mine):.0f} | " + " | ".join(cells) + " |")
print()
print("Medians in ns of every function (median over runs):\n")
keys = sorted(set().union(*runs))
for k in keys:
    vals = [r[k] for r in runs if k in r]
    print(f"- {k}: {statistics.median(vals):.1f}  (runs: {', '.join(f'{v:.1f}' for v in vals)})")
EOF
}

if [[ ${1:-} == --report ]]; then
    shift
    report "$@"
    exit 0
fi
runs=${1:-3}
files=()
for n in $(seq 1 "$runs"); do
    echo "== run $n of $runs (load: $(cut -d' ' -f1-3 /proc/loadavg))" >&2
    cargo bench --bench peers -- 'peers_(get|insert)/' >&2
    collect "$out/peers-run-$n.json"
    files+=("$out/peers-run-$n.json")
done
echo "commit $(git rev-parse --short HEAD); load after: $(cut -d' ' -f1-3 /proc/loadavg)"
report "${files[@]}"
