-- The study page's curves: per method and evaluated checkpoint, mean and SD over seeds of the
-- in-domain accuracy and the OOD average (%).
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
), 
per_run AS (
    SELECT
        s.run_id, s.method, s.method_label, s.seed, m.iteration,
        avg(m.accuracy) FILTER (WHERE m.modality = s.in_domain_modality) AS id_acc,
        avg(m.accuracy) FILTER (WHERE m.modality <> s.in_domain_modality) AS ood_acc,
        avg(m.accuracy) AS avg_acc,
        count(*) AS n_modalities
    FROM study_runs AS s
    JOIN eval_metrics AS m ON m.run_id = s.run_id
    GROUP BY ALL
)
SELECT
    p.method,
    any_value(p.method_label) AS method_label,
    p.iteration,
    count(*) AS n_seeds,
    round(100 * avg(p.id_acc), 2) AS id_mean,
    round(100 * stddev_samp(p.id_acc), 2) AS id_sd,
    round(100 * avg(p.ood_acc), 2) AS ood_mean,
    round(100 * stddev_samp(p.ood_acc), 2) AS ood_sd
FROM per_run AS p
JOIN method_order AS o ON o.method = p.method
GROUP BY p.method, o.first_created, p.iteration
ORDER BY o.first_created, p.method, p.iteration
