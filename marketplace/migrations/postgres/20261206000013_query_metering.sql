-- How a query's compute was metered for its consumer: "exact", or
-- "withheld" on a product whose output policy withholds rows (its fuel,
-- compute units, time, rows and bytes read would count those rows, so
-- they are not stored with the query).
ALTER TABLE queries ADD COLUMN metering TEXT NOT NULL DEFAULT 'exact';
