-- Teacher hints that never led to an accepted hint-aware trajectory: one row per hint, with how
-- many attempts were spent, how many hint-aware samples were correct anyway (rejected for
-- leakage, or short of an accept rule of 'all'), and whether the hint had to be used raw.
SELECT
    h.run_id,
    h.iteration,
    h.prompt_id,
    p.modality,
    p.question_type,
    p.gold_letter,
    h.parse_ok,
    h.malformed_rule,
    p.n_attempts,
    count(a.attempt_id) AS n_samples,
    count(a.attempt_id) FILTER (WHERE a.reward_accuracy = 1) AS n_correct,
    count(a.attempt_id) FILTER (WHERE a.leak_flag) AS n_leaks,
    h.hint_text
FROM hints AS h
JOIN prompts AS p
    ON p.run_id = h.run_id AND p.iteration = h.iteration AND p.prompt_id = h.prompt_id
LEFT JOIN hint_attempts AS a
    ON a.run_id = h.run_id AND a.iteration = h.iteration AND a.prompt_id = h.prompt_id
WHERE p.n_injected = 0
GROUP BY
    h.run_id, h.iteration, h.prompt_id, p.modality, p.question_type, p.gold_letter,
    h.parse_ok, h.malformed_rule, p.n_attempts, h.hint_text
ORDER BY h.run_id, h.iteration, h.prompt_id
