#!/usr/bin/env bash
# Adapter affinity against least connections, on the local cluster (deploy/local-cluster.sh), same load.
#   loadtest/compare_gateways.sh [ROUNDS=2] [USERS=8] [SECONDS=90]
# Each run starts a fresh cluster (cold caches, the same for both policies) with GATEWAY_POLICY set, uploads
# 8 random adapters once (kept in Redis under one namespace), then runs loadtest/run.sh through the gateway
# with Zipf-drawn adapters (ZipfUser, OpenAIUser). Policies alternate within each round, so a busy spell on the
# machine hits both; the table gives the median of the rounds. Results: loadtest/results/gateways-<time>/.
set -euo pipefail
rounds=${1:-2} users=${2:-8} seconds=${3:-90}
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
py=$repo/.venv/bin/python
out=$here/results/gateways-$(date +%Y%m%d-%H%M%S)
replicas=${SHIRA_REPLICAS:-3} port=${CLUSTER_PORT:-8100}
export SHIRA_REPLICAS=$replicas CLUSTER_PORT=$port CLUSTER_DIR=${CLUSTER_DIR:-$out/cluster}
export SHIRA_NAMESPACE=${SHIRA_NAMESPACE:-gateway-compare}
export SHIRA_ADMIN_TOKEN=${SHIRA_ADMIN_TOKEN:-$("$py" -c "import secrets; print(secrets.token_urlsafe(24))")}
export LOCUST_CLASSES=${LOCUST_CLASSES:-"ZipfUser OpenAIUser"}
urls=$(for i in $(seq "$replicas"); do printf 'http://127.0.0.1:%d,' $((port + i)); done)
mkdir -p "$out"
trap '"$repo/deploy/local-cluster.sh" down >/dev/null 2>&1 || true' EXIT

adapters=""
for round in $(seq "$rounds"); do
    for policy in affinity least_conn; do
        echo "== round $round: $policy" >&2
        "$repo/deploy/local-cluster.sh" down >/dev/null 2>&1 || true
        GATEWAY_POLICY=$policy "$repo/deploy/local-cluster.sh" up >&2
        gateway=http://127.0.0.1:$port
        [[ -n $adapters ]] || adapters=$("$py" "$here/setup.py" "$gateway" --count 8 --token "$SHIRA_ADMIN_TOKEN")
        SHIRA_ADAPTERS=$adapters METRICS_URLS=${urls%,} \
            "$here/run.sh" "$gateway" "$users" "$seconds" "$out/$policy-$round" >&2
    done
done

"$py" - "$out" <<'EOF'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
keys = ["tokens_s", "p50_ms", "p99_ms", "switches_s", "cache_hit_rate", "failures", "requests"]
runs = {}
for f in sorted(out.glob("*/totals.json")):
    runs.setdefault(f.parent.name.rsplit("-", 1)[0], []).append(json.loads(f.read_text()))
lines = ["| gateway | tokens/s | p50 ms | p99 ms | switches/s | cache hit rate | failures / requests |",
         "|---|---:|---:|---:|---:|---:|---:|"]
for policy, rows in runs.items():
    m = {k: statistics.median(r[k] for r in rows if r.get(k) is not None) for k in keys}
    lines.append(f"| {policy} | {m['tokens_s']:.1f} | {m['p50_ms']:.0f} | {m['p99_ms']:.0f} | {m['switches_s']:.2f} | "
                 f"{m['cache_hit_rate']:.3f} | {sum(r['failures'] for r in rows)} / {sum(r['requests'] for r in rows)} |")
text = "\n".join(lines) + f"\n\nMedian of {max(len(r) for r in runs.values())} rounds; runs in {out}.\n"
(out / "comparison.md").write_text(text)
print(text, end="")
EOF
