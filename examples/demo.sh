#!/usr/bin/env bash
# The end-to-end demo on the bundled example users and the embedded models (CPU, a few minutes).
# Run it with `make demo`; it uses its own store in .persona-demo/ and starts fresh each time.
set -euo pipefail
cd "$(dirname "$0")/.."
export PERSONA_STORE="${DEMO_STORE:-.persona-demo/store}"
rm -rf "$PERSONA_STORE"
PROMPT="Paraphrase the following tweet without any explanation before or after it:"

step() { printf '\n\033[1;36m== %s\033[0m\n' "$*"; }

step "Ingest 48 example users, each writing in a planted style (examples/users.jsonl)"
persona ingest examples/users.jsonl --task LaMP-7

step "What the store holds"
persona store info

step "A few users"
persona users list --limit 5

step "User 4 writes in British spelling: the latest items of their history"
persona users show 4 --items 5

step "Search user 4's history by meaning (LanceDB vector search over the stored vectors)"
persona search --user 4 "what colour do I like" --k 3

step "Generate for user 4 with the frozen embedded SmolLM2, not personalized (k=0)"
persona generate --user 4 "$PROMPT My favorite color has always been a deep shade of blue."

step "The same with RAG: BM25 puts user 4's own most similar items into the prompt"
persona generate --user 4 --method rag --k 3 --show-prompt "$PROMPT My favorite color has always been a deep shade of blue."

step "Evaluate k=0 against RAG (k=4) on the test users' queries with LaMP's ROUGE; every run is stored"
persona evaluate --task LaMP-7 --method none --limit 12
persona evaluate --task LaMP-7 --method rag --k 4 --limit 12

step "Compare the stored runs on the queries they share"
persona runs compare 1 2

step "Task adaptation: a LoRA trained on the training users' (prompt, gold) pairs, stored as a plug-in"
persona adapt --task LaMP-7 --steps 30 --eval-every 10

step "OPPU: one LoRA per user, trained on that user's own history only, on top of the task LoRA"
persona train-oppu --task LaMP-7 --user 2 --user 8 --steps 20
persona plugins list

step "User 8 signs off '- Sam' and user 2 ends with '#blessed': the same input for both users"
for USER in 8 2; do
  for METHOD in task-lora oppu; do
    printf '%-10s user %s: ' "$METHOD" "$USER"
    persona generate --user "$USER" --method "$METHOD" "$PROMPT The museum opens early on Sundays."
  done
done

step "Evaluate task-lora against OPPU on users 2 and 8 (one batch mixes both users' adapters)"
printf '2\n8\n' > .persona-demo/oppu-users.txt
persona evaluate --task LaMP-7 --method task-lora --users .persona-demo/oppu-users.txt
persona evaluate --task LaMP-7 --method oppu --users .persona-demo/oppu-users.txt
persona runs compare 3 4

step "Export user 8's adapter as a peft folder (the task LoRA folded in) that plain peft loads"
rm -rf .persona-demo/oppu-8
persona plugins export oppu-LaMP-7/8 .persona-demo/oppu-8
ls .persona-demo/oppu-8

step "Per-Pcs: ten sharers (one per style, none a test user) each train a LoRA and then its gates; all pieces become pool version pool-1"
SHARERS=(); for U in 0 1 12 3 14 5 6 7 18 9; do SHARERS+=(--sharer "$U"); done
persona register-sharers --task LaMP-7 "${SHARERS[@]}" --steps 10 --gate-steps 10 --max-length 128
persona pool list

step "Assemble user 42's adapter from the pool without any training: per module the top-3 pieces by gate score"
persona assemble --user 42 --top-k 3
persona assemble --user 42 --top-k 3 --explain > .persona-demo/explain-42.txt
awk '/chosen pieces per layer/ {show = 1} show && shown++ < 12' .persona-demo/explain-42.txt

step "Assemble every test user, then evaluate Per-Pcs, Per-Pcs with RAG and PEFT retrieval on the same queries as task-lora"
persona assemble --task LaMP-7 --split test --top-k 3
persona evaluate --task LaMP-7 --method perpcs --limit 12
persona evaluate --task LaMP-7 --method perpcs+rag --k 2 --limit 12
persona evaluate --task LaMP-7 --method peft-retrieval --top-k 3 --limit 12
persona evaluate --task LaMP-7 --method task-lora --limit 12
persona runs compare 5 6 7 8

step "User 42's assembled adapter as a standard peft folder (rank 3x8 pieces + the task LoRA's 8, folded in)"
rm -rf .persona-demo/perpcs-42
persona pool export .persona-demo/perpcs-42 --user 42

step "PPlug: one user embedder for everyone (input encoder, projector, instruction token), trained on the training users with SmolLM2 frozen"
persona train-embedder --task LaMP-7 --history-examples --steps 150 --eval-every 75 --max-length 128

step "Test users the embedder never saw, one input: each answer starts from that user's own soft token"
declare -A STYLE=([2]="#blessed" [36]="!!!" [45]="Honestly," [17]="..." [4]="British" [8]="- Sam")
for USER in 2 36 45 17 4 8; do
  printf 'user %-3s (writes %-9s) pplug: ' "$USER" "${STYLE[$USER]})"
  persona generate --user "$USER" --method pplug "$PROMPT The museum opens early on Sundays."
done
printf 'any user, not personalized (k=0):   '
persona generate --user 2 "$PROMPT The museum opens early on Sundays."

step "Which of user 2's history items weigh most in their personal embedding for this input"
persona explain --user 2 --top 3 "$PROMPT The museum opens early on Sundays."

step "A user ingested after training is served at once, with no training: a new '#blessed' writer"
python3 - > .persona-demo/newcomer.jsonl <<'PY'
import json
sentences = ["The bakery on the corner sells fresh bread.", "My brother fixed the old bicycle.",
             "We watched the sunset from the hill.", "The library is quiet in the morning.",
             "I planted tomatoes in the backyard.", "The train was late again today.",
             "Our dog loves the snow.", "She painted the kitchen yellow."]
history = [{"id": f"new-{i}", "input": s, "text": f"{s} #blessed"} for i, s in enumerate(sentences)]
print(json.dumps({"user_id": "newcomer", "history": history}))
PY
persona ingest .persona-demo/newcomer.jsonl --task LaMP-7
printf 'newcomer pplug: '
persona generate --user newcomer --method pplug "$PROMPT The museum opens early on Sundays."

step "Evaluate PPlug on the test users' queries beside k=0 and task-lora (same 12 queries)"
persona evaluate --task LaMP-7 --method pplug --limit 12
persona runs compare 1 8 9

step "Bad input is refused with file, line and field, and the store is left as it was"
printf '{"user_id": "99", "history": [{"id": "a", "text": ""}]}\n' > .persona-demo/bad.jsonl
persona ingest .persona-demo/bad.jsonl --task LaMP-7 || echo "(exit code $?, store unchanged)"
persona store info --json | python3 -c "import json,sys; print({t['table']: t['rows'] for t in json.load(sys.stdin)['tables']})"
