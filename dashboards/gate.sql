-- Quality gate of the distillation term (eq. 7): fraction of trained rows whose gate is open,
-- per run, iteration and source ('policy' samples, 'hint' = injected hint-aware trajectories),
-- with the mean rewards of open and closed rows and how many rows have stored teacher top-k
-- (offline distillation only).
SELECT
    o.run_id,
    o.iteration,
    o.source,
    count(*) AS n_trained,
    count(*) FILTER (WHERE o.gate_open) AS n_gate_open,
    round(count(*) FILTER (WHERE o.gate_open) / count(*), 4) AS gate_frac_open,
    round(avg(o.reward_total) FILTER (WHERE o.gate_open), 4) AS open_mean_total,
    round(avg(o.reward_total) FILTER (WHERE NOT o.gate_open), 4) AS closed_mean_total,
    round(avg(o.reward_accuracy) FILTER (WHERE o.gate_open), 4) AS open_mean_accuracy,
    count(t.sample_idx) AS n_teacher_topk
FROM rollouts AS o
LEFT JOIN teacher_topk AS t
    ON t.run_id = o.run_id AND t.iteration = o.iteration
    AND t.prompt_id = o.prompt_id AND t.sample_idx = o.sample_idx
WHERE o.trained
GROUP BY o.run_id, o.iteration, o.source
ORDER BY o.run_id, o.iteration, o.source
