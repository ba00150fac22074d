-- The log's primary key becomes (tx, position), the order every global read uses, replacing the
-- separate (tx, position) index: one index fewer to maintain per appended event. Nothing looks
-- events up by `position` alone; `position` stays unique (an identity column).
ALTER TABLE events DROP CONSTRAINT events_pkey;
ALTER TABLE events ADD CONSTRAINT events_pkey PRIMARY KEY (tx, position);
DROP INDEX events_tx_position_idx;
