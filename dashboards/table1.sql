-- Table 1 of the paper: accuracy (%) per modality at each run's LAST evaluated checkpoint,
-- one row per evaluated run, columns in the paper's order. Avg is the mean of the per-modality
-- accuracies (each modality weighs the same, as in the paper); Avg_OOD is that mean over the
-- modalities other than the run's in-domain (training) modality, taken from its config.
-- A checkpoint whose evaluation was interrupted shows NULL for its unfinished modalities
-- (n_modalities < 8) until `kepo eval` resumes it.
WITH last_checkpoint AS (
    SELECT run_id, max(iteration) AS iteration
    FROM eval_metrics
    GROUP BY run_id
),
accuracy AS (
    SELECT m.run_id, m.iteration, m.modality, m.accuracy, m.n
    FROM eval_metrics AS m
    JOIN last_checkpoint AS l ON m.run_id = l.run_id AND m.iteration = l.iteration
)
SELECT
    r.run_id,
    r.method_label,
    r.in_domain_modality,
    a.iteration,
    round(100 * max(a.accuracy) FILTER (WHERE a.modality = 'MRI'), 2) AS MRI,
    round(100 * max(a.accuracy) FILTER (WHERE a.modality = 'CT'), 2) AS CT,
    round(100 * max(a.accuracy) FILTER (WHERE a.modality = 'X-Ray'), 2) AS XR,
    round(100 * max(a.accuracy) FILTER (WHERE a.modality = 'Ultrasound'), 2) AS US,
    round(100 * max(a.accuracy) FILTER (WHERE a.modality = 'Dermoscopy'), 2) AS Der,
    round(100 * max(a.accuracy) FILTER (WHERE a.modality = 'Fundus'), 2) AS Fun,
    round(100 * max(a.accuracy) FILTER (WHERE a.modality = 'OCT'), 2) AS OCT,
    round(100 * max(a.accuracy) FILTER (WHERE a.modality = 'Microscopy'), 2) AS Mic,
    round(100 * avg(a.accuracy), 2) AS Avg,
    round(100 * avg(a.accuracy) FILTER (WHERE a.modality <> r.in_domain_modality), 2) AS Avg_OOD,
    count(*) AS n_modalities,
    sum(a.n) AS n_items
FROM runs AS r
JOIN accuracy AS a ON a.run_id = r.run_id
GROUP BY r.run_id, r.method_label, r.in_domain_modality, r.created_at, a.iteration
ORDER BY r.created_at, r.run_id
