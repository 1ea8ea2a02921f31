-- Checkpoints cosigned by every configured witness (C2SP tlog-witness):
-- the whole note, the log's signature followed by the witnesses'
-- cosignatures, as `audit verify --witness-key` checks it. The signing key
-- is never stored here. `cosigned_at` is Unix ms by the server's clock.
CREATE TABLE cosigned_checkpoints (
    tree_size BIGINT PRIMARY KEY,
    note TEXT NOT NULL,
    cosigned_at BIGINT NOT NULL
);
