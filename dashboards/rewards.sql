-- Mean rewards per run and iteration: over the rows the training step used (trained = true,
-- injected hint-aware trajectories included) and over the on-policy samples alone
-- (source = 'policy', replaced ones included). Rewards: format and accuracy are 0/1, total 0..2.
SELECT
    o.run_id,
    r.method_label,
    o.iteration,
    count(*) FILTER (WHERE o.trained) AS n_trained,
    round(avg(o.reward_format) FILTER (WHERE o.trained), 4) AS trained_format,
    round(avg(o.reward_accuracy) FILTER (WHERE o.trained), 4) AS trained_accuracy,
    round(avg(o.reward_total) FILTER (WHERE o.trained), 4) AS trained_total,
    count(*) FILTER (WHERE o.source = 'policy') AS n_policy,
    round(avg(o.reward_format) FILTER (WHERE o.source = 'policy'), 4) AS policy_format,
    round(avg(o.reward_accuracy) FILTER (WHERE o.source = 'policy'), 4) AS policy_accuracy,
    round(avg(o.reward_total) FILTER (WHERE o.source = 'policy'), 4) AS policy_total
FROM rollouts AS o
JOIN runs AS r ON r.run_id = o.run_id
GROUP BY o.run_id, r.method_label, o.iteration
ORDER BY o.run_id, o.iteration
