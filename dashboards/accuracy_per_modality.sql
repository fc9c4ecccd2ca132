-- Accuracy (%) per run, modality and evaluated checkpoint (iteration k = policy after k training
-- iterations), with the number of test items and the 95 % Wilson interval.
SELECT
    run_id,
    modality,
    iteration,
    in_domain,
    n,
    round(100 * accuracy, 1) AS accuracy,
    round(100 * ci_low, 1) AS ci_low,
    round(100 * ci_high, 1) AS ci_high
FROM eval_metrics
ORDER BY run_id, modality, iteration
