#!/usr/bin/env bash
# Ingest a LaMP task and compare the prompt baselines on it, with the embedded models by default.
#
#   examples/lamp/run_baselines.sh DATA_DIR TASK [evaluate options...]
#
# DATA_DIR holds LaMP's questions.json and outputs.json; TASK is LaMP-1 ... LaMP-7 (or LaMP-2N).
# Options after TASK go to every `persona evaluate`, e.g. --limit 50, --split all, --answer generate,
# --batch-size 16. The store is $PERSONA_STORE, else .persona-lamp/TASK. Prints the comparison table
# and writes it as JSON to $RESULTS (default: .persona-lamp/TASK-compare.json).
set -euo pipefail

if [[ $# -lt 2 ]]; then
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
data_dir=$1
task=$2
shift 2
persona=${PERSONA:-persona}
store=${PERSONA_STORE:-.persona-lamp/$task}
results=${RESULTS:-.persona-lamp/$task-compare.json}
mkdir -p "$(dirname "$results")"

for file in questions.json outputs.json; do
    [[ -f "$data_dir/$file" ]] || { echo "error: $data_dir/$file does not exist" >&2; exit 2; }
done

echo "== ingest $data_dir ($task) into $store"
"$persona" --store "$store" ingest --format lamp "$data_dir/questions.json" \
    --outputs "$data_dir/outputs.json" --task "$task"

run_ids=()
evaluate() {
    echo "== evaluate $*"
    local out
    out=$("$persona" --store "$store" evaluate --task "$task" --json "$@")
    local id
    id=$(printf '%s' "$out" | python3 -c 'import json, sys; r = json.load(sys.stdin); print(r["run_id"]); print("   ", r["method"], r["config"]["answer"], r["n_examples"], "examples", {k: round(v, 4) for k, v in r["metrics"].items()}, r["examples_per_s"], "examples/s", file=sys.stderr)')
    run_ids+=("$id")
}

evaluate --method none "$@"
evaluate --method random --k 1 "$@"
evaluate --method rag --retriever bm25 --k 1 "$@"
evaluate --method rag --retriever bm25 --k 4 "$@"
evaluate --method rag --retriever recency --k 1 "$@"
evaluate --method rag --retriever dense --k 1 "$@"
evaluate --method pag "$@"

"$persona" --store "$store" runs compare "${run_ids[@]}"
"$persona" --store "$store" runs compare "${run_ids[@]}" --json > "$results"
echo "comparison written to $results"
