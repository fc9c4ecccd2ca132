-- The runs of a study (`kepo study`) in one role, in the order they were registered.
-- Parameters: $study (the study name), $role ('method' = compared methods, 'teacher' = the
-- teacher evaluated as a reference).
WITH
study_runs AS (
    SELECT
        run_id, method_label, in_domain_modality, created_at,
        json_extract_string(config_json, '$.study.method') AS method,
        CAST(json_extract_string(config_json, '$.study.seed') AS BIGINT) AS seed
    FROM runs
    WHERE json_extract_string(config_json, '$.study.name') = $study
      AND json_extract_string(config_json, '$.study.role') = $role
),
method_order AS (
    SELECT method, min(created_at) AS first_created FROM study_runs GROUP BY method
)
SELECT run_id, method, seed, method_label, in_domain_modality FROM study_runs
ORDER BY created_at, run_id
