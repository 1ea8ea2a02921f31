-- What runners report (docs/runners.md), as checked by the server whose
-- directory received each report: a runner reports to one server behind the
-- load balancer, and every server sharing the database picks from all.
-- `status` is the report (civicgrid.runner.v1.RunnerStatus, protobuf);
-- `seen_at` the database's clock, Unix ms.
CREATE TABLE runner_reports (
    data_center TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    status BYTEA NOT NULL,
    seen_at BIGINT NOT NULL,
    PRIMARY KEY (data_center, endpoint)
);
