-- The 95 % Wilson intervals behind Table 1: per run, at its LAST evaluated checkpoint (the one
-- table1 shows), one row per modality with the accuracy, the interval (%, from eval_metrics) and
-- the item counts. Long format, so `kepo sql --query table1` keeps the paper's columns.
WITH last_checkpoint AS (
    SELECT run_id, max(iteration) AS iteration
    FROM eval_metrics
    GROUP BY run_id
)
SELECT
    m.run_id,
    r.method_label,
    m.iteration,
    m.modality,
    m.in_domain,
    m.n,
    m.n_correct,
    round(100 * m.accuracy, 2) AS accuracy,
    round(100 * m.ci_low, 2) AS ci_low,
    round(100 * m.ci_high, 2) AS ci_high
FROM eval_metrics AS m
JOIN last_checkpoint AS l ON m.run_id = l.run_id AND m.iteration = l.iteration
JOIN runs AS r ON r.run_id = m.run_id
ORDER BY r.created_at, m.run_id, m.modality
