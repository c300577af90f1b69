#!/usr/bin/env bash
# A producer that is not Python: submit an edit to `memoir serve` over HTTP, wait until the worker
# has applied it and the server serves it, ask the model, roll the edit back, wait for that too.
# Needs curl, grep, sed and cut only.
#
#   MEMOIR_URL=http://127.0.0.1:8000 MEMOIR_API_KEY=... ./scripts/edit_over_http.sh
#
# MEMOIR_URL (default http://127.0.0.1:8000), MEMOIR_API_KEY (a read-write key; leave it unset when
# the server has no keys), EDIT_ID (the Idempotency-Key; running again with the same id and payload
# gives the same edit), PROMPT, TARGET, TIMEOUT (seconds each step may take, default 300).
set -euo pipefail
shopt -s inherit_errexit  # a failed call inside $(...) stops the script too

URL=${MEMOIR_URL:-http://127.0.0.1:8000}
ID=${EDIT_ID:-http-demo-$(date +%s)}
PROMPT=${PROMPT:-What university did Watts Humphrey attend?}
TARGET=${TARGET:-University of Michigan}
TIMEOUT=${TIMEOUT:-300}
MAX_TOKENS=${MAX_TOKENS:-16}
auth=()
if [ -n "${MEMOIR_API_KEY:-}" ]; then auth=(-H "Authorization: Bearer ${MEMOIR_API_KEY}"); fi

json_text() { printf '"%s"' "$(printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g')"; }  # text as a JSON string
text_of() { grep -o "\"$1\":\"[^\"]*\"" | head -n 1 | cut -d '"' -f 4 || true; }     # first "field":"text"
number_of() { grep -o "\"$1\":[0-9]*" | head -n 1 | cut -d ':' -f 2 || true; }       # first "field":123

call() {  # METHOD PATH [BODY] [IDEMPOTENCY-KEY]: the response body; an HTTP error is shown and fails
  local out code
  out=$(mktemp)
  code=$(curl -sS -o "$out" -w '%{http_code}' -X "$1" "$URL$2" ${auth[@]+"${auth[@]}"} \
         -H 'Content-Type: application/json' ${4:+-H "Idempotency-Key: $4"} ${3:+--data-binary "$3"})
  if [ "$code" -ge 400 ]; then echo "HTTP $code on $1 $2: $(cat "$out")" >&2; rm -f "$out"; return 1; fi
  cat "$out"
  rm -f "$out"
}

until_status() {  # ID STATUS: poll GET /v1/edits/ID until its status is STATUS (fails on `failed`)
  local deadline=$((SECONDS + TIMEOUT)) status
  while true; do
    status=$(call GET "/v1/edits/$1" | text_of status)
    [ "$status" = "$2" ] && { echo "$status"; return 0; }
    case $status in applied|failed|rolled_back|done)  # ended otherwise (e.g. an EDIT_ID used before)
      echo "request $1 is $status, not $2: $(call GET "/v1/edits/$1")" >&2; return 1;; esac
    [ $SECONDS -ge $deadline ] && { echo "request $1 is still $status after $TIMEOUT s" >&2; return 1; }
    sleep 0.5
  done
}

served_version() { call GET /v1/memory | number_of version; }

until_served_moves() {  # VERSION: wait until the server serves a memory version other than VERSION
  local deadline=$((SECONDS + TIMEOUT))
  while [ "$(served_version)" = "$1" ]; do
    [ $SECONDS -ge $deadline ] && { echo "the server still serves version $1 after $TIMEOUT s" >&2; return 1; }
    sleep 0.5
  done
}

ask() { call POST /v1/completions "{\"prompt\": $(json_text "$PROMPT"), \"max_tokens\": $MAX_TOKENS}" | text_of text; }

echo "question:    $PROMPT"
answer=$(ask); echo "before:      $answer"
version=$(served_version)
body="{\"prompt\": $(json_text "$PROMPT"), \"target\": $(json_text "$TARGET")}"
status=$(call POST /v1/edits "$body" "$ID" | text_of status); echo "submitted:   $ID ($status)"
status=$(until_status "$ID" applied); echo "edit:        $status"
until_served_moves "$version"
answer=$(ask); echo "after edit:  $answer"
version=$(served_version)
status=$(call POST "/v1/edits/$ID/rollback" '{"reason": "edit_over_http.sh"}' "$ID-rollback" | text_of status)
echo "rollback:    $ID-rollback ($status)"
status=$(until_status "$ID-rollback" done); echo "rollback:    $status"
status=$(until_status "$ID" rolled_back); echo "edit:        $status"
until_served_moves "$version"
answer=$(ask); echo "after undo:  $answer"
