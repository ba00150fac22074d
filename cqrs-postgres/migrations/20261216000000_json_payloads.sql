-- Payloads and metadata are stored as `json` (the text as written, validated on the way in)
-- instead of `jsonb` (parsed into a binary tree and printed back on every read). The store never
-- queries inside them; every read hands the text to a decoder, so `jsonb`'s printing was a cost
-- per row read (a large part of a long stream's load and of a catch-up) with nothing bought.
-- The stored text is also what the writer sent, byte for byte: key order, number formatting.
-- For ad-hoc queries, `payload::jsonb` (and an expression index on it) still works.
ALTER TABLE events ALTER COLUMN payload TYPE json USING payload::json,
                   ALTER COLUMN metadata TYPE json USING metadata::json;
ALTER TABLE snapshots ALTER COLUMN payload TYPE json USING payload::json;
