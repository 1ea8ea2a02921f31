-- A revision of a registered product that changes what it serves (its
-- storage, tables, sensitivity or output policy) waits here for review; the
-- product keeps serving its current spec until a platform admin approves it.
ALTER TABLE products ADD COLUMN pending_spec BLOB;
