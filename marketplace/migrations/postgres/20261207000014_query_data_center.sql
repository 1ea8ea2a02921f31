-- The data center whose runner ran a query (docs/runners.md); empty for
-- queries the marketplace ran in its own process.
ALTER TABLE queries ADD COLUMN data_center TEXT NOT NULL DEFAULT '';
