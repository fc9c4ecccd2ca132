-- Figure 2 of the paper: per run and evaluated checkpoint (iteration k = policy after k training
-- iterations; 0 = the untrained student), the in-domain accuracy and the mean accuracy over the
-- out-of-distribution modalities (%), in-domain modality from the run's config, with 95 % Wilson
-- intervals (%): the in-domain modality's from eval_metrics, and for the OOD average the Wilson
-- interval of the OOD items pooled (its centre is the pooled accuracy, which equals the OOD
-- average when every modality has the same number of items).
WITH per_checkpoint AS (
    SELECT
        m.run_id,
        r.method_label,
        r.in_domain_modality,
        m.iteration,
        round(100 * avg(m.accuracy) FILTER (WHERE m.modality = r.in_domain_modality), 2) AS id_accuracy,
        round(100 * avg(m.accuracy) FILTER (WHERE m.modality <> r.in_domain_modality), 2) AS ood_average,
        round(100 * avg(m.accuracy), 2) AS average,
        count(*) AS n_modalities,
        sum(m.n) AS n_items,
        round(100 * max(m.ci_low) FILTER (WHERE m.modality = r.in_domain_modality), 2) AS id_ci_low,
        round(100 * max(m.ci_high) FILTER (WHERE m.modality = r.in_domain_modality), 2) AS id_ci_high,
        sum(m.n) FILTER (WHERE m.modality <> r.in_domain_modality) AS ood_n,
        sum(m.n_correct) FILTER (WHERE m.modality <> r.in_domain_modality) AS ood_correct
    FROM eval_metrics AS m
    JOIN runs AS r ON r.run_id = m.run_id
    GROUP BY m.run_id, r.method_label, r.in_domain_modality, m.iteration
),
wilson AS (
    SELECT
        *,
        1.959963984540054 AS z,
        ood_correct / nullif(ood_n, 0) AS ood_p
    FROM per_checkpoint
)
SELECT
    run_id,
    method_label,
    in_domain_modality,
    iteration,
    id_accuracy,
    ood_average,
    average,
    n_modalities,
    n_items,
    id_ci_low,
    id_ci_high,
    round(
        100 * ((ood_p + z * z / (2 * ood_n)) - z * sqrt(ood_p * (1 - ood_p) / ood_n
            + z * z / (4 * ood_n * ood_n))) / (1 + z * z / ood_n),
        2
    ) AS ood_ci_low,
    round(
        100 * ((ood_p + z * z / (2 * ood_n)) + z * sqrt(ood_p * (1 - ood_p) / ood_n
            + z * z / (4 * ood_n * ood_n))) / (1 + z * z / ood_n),
        2
    ) AS ood_ci_high
FROM wilson
ORDER BY run_id, iteration
