-- Per method and iteration of a study: prompts that triggered exploration and the share of
-- those with a trajectory injected (acceptance), with attempt and injection counts.
-- Parameters: $study (the study name), $role ('method' or 'teacher').
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
SELECT
    s.method,
    any_value(s.method_label) AS method_label,
    p.iteration,
    count(*) AS n_prompts,
    count(*) FILTER (WHERE p.triggered) AS n_triggered,
    count(*) FILTER (WHERE p.triggered) / count(*) AS trigger_rate,
    count(*) FILTER (WHERE p.n_injected > 0) AS n_accepted,
    count(*) FILTER (WHERE p.n_injected > 0) / nullif(count(*) FILTER (WHERE p.triggered), 0)
        AS acceptance_rate,
    sum(p.n_attempts) AS n_attempts,
    sum(p.n_injected) AS n_injected
FROM study_runs AS s
JOIN prompts AS p ON p.run_id = s.run_id
JOIN method_order AS o ON o.method = s.method
GROUP BY s.method, o.first_created, p.iteration
ORDER BY o.first_created, s.method, p.iteration
