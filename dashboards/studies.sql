-- Runs launched by `kepo study`: the study each belongs to, its method, seed and role
-- ('method' or 'teacher'), in the order they were registered.
SELECT
    run_id,
    json_extract_string(config_json, '$.study.name') AS study,
    json_extract_string(config_json, '$.study.method') AS method,
    CAST(json_extract_string(config_json, '$.study.seed') AS BIGINT) AS seed,
    json_extract_string(config_json, '$.study.role') AS role
FROM runs
WHERE json_extract_string(config_json, '$.study.name') IS NOT NULL
ORDER BY created_at, run_id
