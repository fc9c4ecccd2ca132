-- Per method and iteration of a study: the share of prompts whose G policy samples were all
-- wrong (the learning cliff), and the mean number of correct policy samples per prompt.
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
    count(DISTINCT s.run_id) AS n_seeds,
    count(*) AS n_prompts,
    count(*) FILTER (WHERE p.n_policy_correct = 0) AS n_all_zero,
    count(*) FILTER (WHERE p.n_policy_correct = 0) / count(*) AS all_zero_rate,
    avg(p.n_policy_correct) AS mean_policy_correct
FROM study_runs AS s
JOIN prompts AS p ON p.run_id = s.run_id
JOIN method_order AS o ON o.method = s.method
GROUP BY s.method, o.first_created, p.iteration
ORDER BY o.first_created, s.method, p.iteration
