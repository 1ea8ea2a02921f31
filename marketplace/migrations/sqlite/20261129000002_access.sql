-- casbin rules: role permissions (ptype p) and role bindings (ptype g).
CREATE TABLE casbin_rules (
    ptype TEXT NOT NULL,
    v0 TEXT NOT NULL,
    v1 TEXT NOT NULL,
    v2 TEXT NOT NULL,
    PRIMARY KEY (ptype, v0, v1, v2)
);
