-- Leak flags on hint-aware outputs (the reasoning mentions the hint or the given answer), per
-- run and iteration: among all hint-aware samples, among accepted ones, and among the injected
-- trajectories the student is trained on (rollouts with source = 'hint').
SELECT
    a.run_id,
    a.iteration,
    count(*) AS n_hint_aware,
    count(*) FILTER (WHERE a.leak_flag) AS n_leaks,
    round(count(*) FILTER (WHERE a.leak_flag) / count(*), 4) AS leak_rate,
    count(*) FILTER (WHERE a.reward_accuracy = 1 AND a.leak_flag) AS n_correct_leaks,
    count(*) FILTER (WHERE a.accepted AND a.leak_flag) AS n_accepted_leaks,
    count(*) FILTER (WHERE a.injected) AS n_injected,
    count(*) FILTER (WHERE a.injected AND a.leak_flag) AS n_injected_leaks,
    round(
        count(*) FILTER (WHERE a.injected AND a.leak_flag)
        / nullif(count(*) FILTER (WHERE a.injected), 0),
        4
    ) AS injected_leak_rate
FROM hint_attempts AS a
GROUP BY a.run_id, a.iteration
ORDER BY a.run_id, a.iteration
