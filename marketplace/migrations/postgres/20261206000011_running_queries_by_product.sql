-- A reservation on a differentially private product counts the consumer's
-- running queries on it (the budget is spent one query at a time); the
-- partial index keeps that read to the few running queries.
CREATE INDEX queries_running_by_product
    ON queries (product_id, consumer_organization_id) WHERE state = 'running';
