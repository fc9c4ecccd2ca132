-- Knowledge-enhanced exploration per run and iteration (Algorithm 1): how often it triggered,
-- how often a hint-aware attempt was accepted, and how many attempts an accepted prompt needed.
-- trigger_rate = triggered / prompts; acceptance_rate = accepted / triggered, where "accepted"
-- means at least one trajectory was injected. triggered_by_batch counts prompts that explored
-- only because another prompt of the batch was all-zero (trigger_scope = batch).
SELECT
    p.run_id,
    r.method_label,
    p.iteration,
    count(*) AS n_prompts,
    count(*) FILTER (WHERE p.triggered) AS n_triggered,
    count(*) FILTER (WHERE p.trigger_reason = 'batch_scope') AS triggered_by_batch,
    round(count(*) FILTER (WHERE p.triggered) / count(*), 4) AS trigger_rate,
    count(*) FILTER (WHERE p.n_injected > 0) AS n_accepted,
    round(
        count(*) FILTER (WHERE p.n_injected > 0)
        / nullif(count(*) FILTER (WHERE p.triggered), 0),
        4
    ) AS acceptance_rate,
    round(avg(p.n_attempts) FILTER (WHERE p.n_injected > 0), 3) AS attempts_per_accepted,
    sum(p.n_attempts) AS n_attempts,
    sum(p.n_injected) AS n_injected,
    count(h.prompt_id) FILTER (WHERE NOT h.parse_ok) AS n_malformed_hints,
    count(h.prompt_id) FILTER (WHERE h.hint_text IS NULL) AS n_hints_skipped
FROM prompts AS p
JOIN runs AS r ON r.run_id = p.run_id
LEFT JOIN hints AS h
    ON h.run_id = p.run_id AND h.iteration = p.iteration AND h.prompt_id = p.prompt_id
GROUP BY p.run_id, r.method_label, p.iteration
ORDER BY p.run_id, p.iteration
