-- Accuracy (%) per question type, per run and evaluated checkpoint, over all modalities and
-- split into in-domain and out-of-distribution items (in-domain modality from the run's config).
SELECT
    p.run_id,
    r.method_label,
    p.iteration,
    p.question_type,
    count(*) AS n,
    count(*) FILTER (WHERE p.correct) AS n_correct,
    round(100 * avg(CAST(p.correct AS DOUBLE)), 2) AS accuracy,
    round(100 * avg(CAST(p.correct AS DOUBLE)) FILTER (WHERE p.modality = r.in_domain_modality), 2) AS id_accuracy,
    round(100 * avg(CAST(p.correct AS DOUBLE)) FILTER (WHERE p.modality <> r.in_domain_modality), 2) AS ood_accuracy
FROM eval_predictions AS p
JOIN runs AS r ON r.run_id = p.run_id
GROUP BY p.run_id, r.method_label, p.iteration, p.question_type
ORDER BY p.run_id, p.iteration, p.question_type
