#!/usr/bin/env bash
# PostgreSQL's side of one group-commit statement: ours (as `cqrs-postgres/src/sql.rs`'s
# `append_many` writes it, without the notification) against the raw group INSERT of
# `benches/src/raw_group.rs`, and ours with one guarantee after another taken away. Eight events per
# statement, each to a new stream; `pgbench` with two sessions and `synchronous_commit = off` (CPU
# only, no WAL flush), every variant in one run so that they take turns statement by statement.
#
#   bash benches/pgbench/group-statement.sh            # 3 runs of 30 s
#   RUNS=1 SECONDS_PER_RUN=10 bash benches/pgbench/group-statement.sh
#
# Needs psql and pgbench; uses DATABASE_URL (default postgres://postgres@127.0.0.1:5432/test) and
# creates, then drops, the schemas gs_raw, gs_ours, gs_notype, gs_noindexes and gs_nolookup.
set -euo pipefail

url=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}
runs=${RUNS:-3}
seconds=${SECONDS_PER_RUN:-30}
root=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"; psql -q "$url" -c "DROP SCHEMA IF EXISTS gs_raw, gs_ours, gs_notype, gs_noindexes, gs_nolookup CASCADE" >/dev/null 2>&1 || true' EXIT

# Our tables come from the store's own migrations, applied in order.
{
    echo "SET client_min_messages = warning;"
    echo "DROP SCHEMA IF EXISTS gs_raw, gs_ours, gs_notype, gs_noindexes, gs_nolookup CASCADE;"
    echo "CREATE SCHEMA gs_ours; SET search_path = gs_ours;"
    for m in "$root"/cqrs-postgres/migrations/*.sql; do echo "\\i $m"; done
    echo "RESET search_path;"
    echo "CREATE SCHEMA gs_notype; CREATE TABLE gs_notype.events (LIKE gs_ours.events INCLUDING ALL);"
    echo "DROP INDEX gs_notype.events_event_type_tx_position_idx;"
    echo "CREATE SCHEMA gs_noindexes; CREATE TABLE gs_noindexes.events (LIKE gs_notype.events INCLUDING ALL);"
    echo "ALTER TABLE gs_noindexes.events DROP CONSTRAINT events_event_id_key;"
    echo "CREATE SCHEMA gs_nolookup; CREATE TABLE gs_nolookup.events (LIKE gs_noindexes.events INCLUDING ALL);"
    # The raw table of `benches/src/db.rs`.
    echo "CREATE SCHEMA gs_raw; CREATE TABLE gs_raw.events (
        position bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, stream_type text NOT NULL,
        stream_id text NOT NULL, stream_version bigint NOT NULL, event_id uuid NOT NULL,
        event_type text NOT NULL, schema_version integer NOT NULL, payload json NOT NULL,
        metadata json NOT NULL, recorded_at timestamptz NOT NULL DEFAULT now(),
        UNIQUE (stream_type, stream_id, stream_version));"
} >"$work/setup.sql"

# One group's arrays, built in the statement: eight new streams (a random 63-bit number each time), a time-ordered event id each (as
# `EventId::new` makes), a W1 deposit's payload and a command's metadata.
ids="ARRAY(SELECT (lpad(to_hex((extract(epoch FROM clock_timestamp()) * 1000)::bigint), 12, '0') || '7' || substr(md5(random()::text), 1, 19))::uuid FROM generate_series(1, 8))"
sids="ARRAY(SELECT 'acc-' || :i || '-' || g FROM generate_series(1, 8) g)"
payload="'{\"Deposited\":{\"amount\":100}}'::text"
metadata="'{\"correlation_id\":\"0b8f7a2e-5c1d-4e3f-9a6b-7c8d9e0f1a2b\",\"causation_id\":\"1c9e8b3f-6d2e-4f4a-8b7c-8d9e0f1a2b3c\"}'::text"

ours() { # $1: schema; $2: "lookup" or "nolookup"
    local lookup version
    if [ "$2" = lookup ]; then
        version="COALESCE(last.stream_version, 0)"
        lookup="LEFT JOIN LATERAL (
            SELECT stream_version FROM $1.events
            WHERE stream_type = u.st AND stream_id = u.sid
            ORDER BY stream_version DESC LIMIT 1
         ) AS last ON true"
    else
        version="0"
        lookup=""
    fi
    cat <<SQL
\\set i random(1, 9000000000000000000)
INSERT INTO $1.events
    (stream_type, stream_id, stream_version, event_id, event_type, schema_version, payload, metadata)
 SELECT u.st, u.sid, $version + u.k, u.id, u.t, u.sv, u.p::json, u.m::json
 FROM (SELECT array_fill('account'::text, ARRAY[8]) AS st, $sids AS sid,
              array_fill(-1::bigint, ARRAY[8]) AS expected, array_fill(1::bigint, ARRAY[8]) AS k,
              $ids AS id, array_fill('Deposited'::text, ARRAY[8]) AS t, array_fill(1, ARRAY[8]) AS sv,
              array_fill($payload, ARRAY[8]) AS p, array_fill($metadata, ARRAY[8]) AS m
       OFFSET 0) AS a
 CROSS JOIN LATERAL UNNEST(a.st, a.sid, a.expected, a.k, a.id, a.t, a.sv, a.p, a.m)
     WITH ORDINALITY AS u(st, sid, expected, k, id, t, sv, p, m, n)
 $lookup
 WHERE CASE WHEN u.expected >= 0 THEN $version = u.expected
            WHEN u.expected = -2 THEN $version > 0 ELSE true END
 ORDER BY u.n
 RETURNING stream_type, stream_id, stream_version, position, tx::text AS tx_text;
SQL
}

cat >"$work/1_raw.sql" <<SQL
\\set i random(1, 9000000000000000000)
INSERT INTO gs_raw.events (stream_type, stream_id, stream_version, event_id, event_type, schema_version, payload, metadata)
 SELECT 'account', u.sid, u.v, u.id, u.t, u.sv, u.p::json, '{}'::json
 FROM UNNEST($sids, array_fill(1::bigint, ARRAY[8]), $ids, array_fill('Deposited'::text, ARRAY[8]),
             array_fill(1, ARRAY[8]), array_fill($payload, ARRAY[8]))
     AS u(sid, v, id, t, sv, p);
SQL
ours gs_ours lookup >"$work/2_ours.sql"
ours gs_notype lookup >"$work/3_notype.sql"
ours gs_noindexes lookup >"$work/4_noindexes.sql"
ours gs_nolookup nolookup >"$work/5_noindexes_nolookup.sql"

names=("raw group INSERT, raw table" "ours, our table" "ours, no type index"
    "ours, no type index, no event-id unique index" "ours, no type index, no event-id index, no version lookup")
for run in $(seq 1 "$runs"); do
    # Fresh tables for every run (our trigger refuses TRUNCATE, as it should).
    psql -q -v ON_ERROR_STOP=1 "$url" -f "$work/setup.sql" >/dev/null
    PGOPTIONS='-c synchronous_commit=off' pgbench -n -M prepared -c 2 -j 2 -T "$seconds" \
        -f "$work/1_raw.sql" -f "$work/2_ours.sql" -f "$work/3_notype.sql" -f "$work/4_noindexes.sql" \
        -f "$work/5_noindexes_nolookup.sql" "$url" >"$work/out" 2>&1 || { cat "$work/out"; exit 1; }
    echo "run $run: ms per statement (mean latency, two sessions)"
    grep -E "latency average =" "$work/out" | tail -n 5 | awk '{print $(NF-1)}' | paste -d' ' - <(printf '%s\n' "${names[@]}")
done
