#!/usr/bin/env bash
# A bounded, headless Locust run with CSV and a Markdown summary.
#   loadtest/run.sh URL USERS DURATION_S [OUT_DIR]
# SHIRA_ADAPTERS (from loadtest/setup.py) picks the adapters; METRICS_URLS (comma-separated replica URLs) names the
# replicas whose /metrics are scraped for switches and cache hits (default: URL itself). LOCUST_CLASSES picks
# user classes (e.g. "ZipfUser OpenAIUser"; default: all of them, weighted).
set -euo pipefail
if [ $# -lt 3 ]; then sed -n '2,5p' "$0"; exit 2; fi
url=$1 users=$2 seconds=$3
here=$(cd "$(dirname "$0")" && pwd)
out=${4:-$here/results/$(date +%Y%m%d-%H%M%S)}
py=${PYTHON:-$here/../.venv/bin/python}
IFS=, read -r -a replicas <<< "${METRICS_URLS:-$url}"
mkdir -p "$out"
"$py" "$here/summary.py" scrape "${replicas[@]}" > "$out/before.json"
"$py" -m locust -f "$here/locustfile.py" --host "$url" --headless -u "$users" -r "$users" -t "${seconds}s" \
    --stop-timeout 30 --csv "$out/locust" --only-summary ${LOCUST_CLASSES:-} || true  # failures are in the summary, not the exit code
"$py" "$here/summary.py" report "$out" --seconds "$seconds" "${replicas[@]}" | tee "$out/summary.md"
