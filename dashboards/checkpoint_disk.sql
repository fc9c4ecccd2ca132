-- Disk used by each run's policy checkpoints, one row per version and a total row per run
-- (version NULL): the folder, the dtype of the saved weights, the bytes the folder holds now
-- (optimizer state included), whether it still has optimizer state (only the newest version
-- keeps it) and its size, and whether train.keep_checkpoints pruned it (its row stays, the
-- weights are gone; bytes 0). Bytes are measured when the version is recorded and updated when
-- its optimizer state or folder is removed; NULL on rows written before that was recorded.
-- Version 0 (the initial student, models.student) is not a run's checkpoint and is not listed.
SELECT * FROM (
    SELECT
        run_id,
        iteration AS version,
        path,
        weights_dtype,
        bytes_on_disk,
        round(bytes_on_disk / 1e6, 1) AS mb_on_disk,
        optimizer_path IS NOT NULL AS has_optimizer,
        optimizer_bytes,
        pruned_at IS NOT NULL AS pruned,
        pruned_at
    FROM checkpoints
    UNION ALL
    SELECT
        run_id,
        NULL AS version,
        'run total' AS path,
        NULL AS weights_dtype,
        sum(bytes_on_disk)::BIGINT AS bytes_on_disk,
        round(sum(bytes_on_disk) / 1e6, 1) AS mb_on_disk,
        bool_or(optimizer_path IS NOT NULL) AS has_optimizer,
        sum(optimizer_bytes)::BIGINT AS optimizer_bytes,
        NULL AS pruned,
        NULL AS pruned_at
    FROM checkpoints
    GROUP BY run_id
)
ORDER BY run_id, version NULLS LAST
