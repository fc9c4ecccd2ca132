-- Figure 2 of the paper: per run and evaluated checkpoint (iteration k = policy after k training
-- iterations; 0 = the untrained student), the in-domain accuracy and the mean accuracy over the
-- out-of-distribution modalities (%), in-domain modality from the run's config.
SELECT
    m.run_id,
    r.method_label,
    r.in_domain_modality,
    m.iteration,
    round(100 * avg(m.accuracy) FILTER (WHERE m.modality = r.in_domain_modality), 2) AS id_accuracy,
    round(100 * avg(m.accuracy) FILTER (WHERE m.modality <> r.in_domain_modality), 2) AS ood_average,
    round(100 * avg(m.accuracy), 2) AS average,
    count(*) AS n_modalities,
    sum(m.n) AS n_items
FROM eval_metrics AS m
JOIN runs AS r ON r.run_id = m.run_id
GROUP BY m.run_id, r.method_label, r.in_domain_modality, m.iteration
ORDER BY m.run_id, m.iteration
